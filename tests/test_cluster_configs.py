"""Every file in cluster/ parses, names entrypoints that exist and accept its flags, and asks for
resources that the cluster it declares can give."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))
RAY_JOBS = [p for p in YAML_FILES if yaml.safe_load(p.read_text()).get("kind") == "RayJob"]


def entrypoint(manifest: dict) -> tuple[str, list[str]]:
    """('jobs.score', [flags...]) from a RayJob's `python -m jobs.<name> ...` entrypoint."""
    words = shlex.split(manifest["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), words[:3]
    return words[2], words[3:]


def option(flags: list[str], name: str, default: float) -> float:
    return float(flags[flags.index(name) + 1]) if name in flags else default


def worker_groups(manifest: dict) -> list[dict]:
    return manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_there_is_a_launcher_config_and_a_rayjob_for_scoring_and_for_training():
    assert len(YAML_FILES) >= 3
    assert sorted(entrypoint(yaml.safe_load(p.read_text()))[0] for p in RAY_JOBS) == ["jobs.score", "jobs.train"]


@pytest.mark.parametrize("path", RAY_JOBS, ids=lambda p: p.name)
def test_each_entrypoint_exists_and_accepts_its_flags(path):
    module_name, flags = entrypoint(yaml.safe_load(path.read_text()))
    module = importlib.import_module(module_name)
    module.build_parser().parse_args(flags)  # exits (SystemExit) on an unknown or malformed flag
    help_text = run_cli(module_name, "--help", timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    for flag in (f for f in flags if f.startswith("--")):
        assert flag in help_text.stdout, f"{path.name}: {flag} is not in `python -m {module_name} --help`"


@pytest.mark.parametrize("path", RAY_JOBS, ids=lambda p: p.name)
def test_rayjob_resources_fit_the_cluster_it_declares(path):
    manifest = yaml.safe_load(path.read_text())
    module_name, flags = entrypoint(manifest)
    groups = worker_groups(manifest)
    gpus = sum(g["replicas"] * int(limits(g).get("nvidia.com/gpu", 0)) for g in groups)
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)
    assert manifest["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    if module_name == "jobs.score":
        actors = option(flags, "--actors", 1)
        assert actors * option(flags, "--num-gpus-per-actor", 0) <= gpus
        gpu_groups = [g for g in groups if int(limits(g).get("nvidia.com/gpu", 0))]
        per_gpu_node_cpus = min(float(limits(g)["cpu"]) for g in gpu_groups)
        per_node_actors = option(flags, "--actors", 1) / sum(g["replicas"] for g in gpu_groups)
        assert per_node_actors * option(flags, "--cpus-per-actor", 1) <= per_gpu_node_cpus
    else:
        assert "--use-gpu" in flags and option(flags, "--workers", 1) <= gpus


def test_launcher_config_is_consistent():
    config = yaml.safe_load((CLUSTER / "aws-gpu-cluster.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0  # no work on the head
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0 for t in types.values())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_dockerfile_copies_only_what_exists():
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            assert all((REPO / s).exists() for s in sources), line
