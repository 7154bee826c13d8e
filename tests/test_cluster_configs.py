"""Every file in cluster/ parses, names entrypoints that exist and accept its flags, and asks for
resources that the cluster it declares can give; every node gets the object-store credentials and the
Ray auth token, and runs one pinned image built on requirements.lock."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

CLUSTER = REPO / "cluster"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))
RAY_JOBS = [p for p in YAML_FILES if yaml.safe_load(p.read_text()).get("kind") == "RayJob"]
LAUNCHER = CLUSTER / "aws-gpu-cluster.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
LOCK = REPO / "requirements.lock"
# KubeRay's convention: the Secret named by authOptions.secretName holds the token under this key.
KUBERAY_TOKEN_KEY = "auth_token"


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


def locked_version(package: str) -> str:
    pins = dict(line.split("==", 1) for line in LOCK.read_text().splitlines() if "==" in line)
    return pins[package]


def is_pinned(image: str) -> bool:
    """A digest, or a tag that is not `latest` (a registry host's `:port` is not a tag)."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.rsplit(":", 1)[1] not in ("", "latest")


def pod_specs(manifest: dict) -> dict[str, dict]:
    """Every pod a RayJob starts, by role: the head, each worker group, the submitter if it has a template."""
    cluster = manifest["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({f"worker group {g['groupName']}": g["template"]["spec"] for g in worker_groups(manifest)})
    if "submitterPodTemplate" in manifest["spec"]:
        pods["submitter"] = manifest["spec"]["submitterPodTemplate"]["spec"]
    return pods


def env_var(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("path", RAY_JOBS, ids=lambda p: p.name)
def test_every_rayjob_pod_gets_the_object_store_credentials(path):
    """The Ray Jobs driver runs on the head (it lists the input and writes the run records): the head needs
    the workers' S3 credentials, from one Secret (envFrom secretRef) or a service account (IRSA)."""
    secrets = set()
    for role, spec in pod_specs(yaml.safe_load(path.read_text())).items():
        if role == "submitter":
            continue  # it only submits; it never touches the object store
        for container in spec["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert refs or spec.get("serviceAccountName"), f"{path.name}: {role} has no S3 credentials"
            secrets.update(refs)
    assert len(secrets) <= 1, f"{path.name}: the pods read different credential Secrets {secrets}"


@pytest.mark.parametrize("path", RAY_JOBS, ids=lambda p: p.name)
def test_every_rayjob_container_gets_the_auth_token_from_one_secret(path):
    manifest = yaml.safe_load(path.read_text())
    auth = manifest["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token"
    # With secretName KubeRay uses this Secret (key auth_token) and generates none of its own, so its
    # injected variables, the submitter and the explicit ones below all carry the same token.
    assert auth.get("secretName"), f"{path.name}: authOptions.secretName names no Secret"
    for role, spec in pod_specs(manifest).items():
        for container in spec["containers"]:
            mode, token = env_var(container, "RAY_AUTH_MODE"), env_var(container, "RAY_AUTH_TOKEN")
            assert mode and mode.get("value") == "token", f"{path.name}: {role} lacks RAY_AUTH_MODE=token"
            assert token and "value" not in token, f"{path.name}: {role}: RAY_AUTH_TOKEN must come from a Secret"
            ref = token.get("valueFrom", {}).get("secretKeyRef", {})
            assert ref == {"name": auth["secretName"], "key": KUBERAY_TOKEN_KEY}, f"{path.name}: {role}: {ref}"


def test_every_image_is_one_pinned_tag_on_the_ray_version_of_the_lock():
    images = {}
    for path in RAY_JOBS:
        manifest = yaml.safe_load(path.read_text())
        assert manifest["spec"]["rayClusterSpec"]["rayVersion"] == locked_version("ray"), path.name
        for role, spec in pod_specs(manifest).items():
            for container in spec["containers"]:
                images[f"{path.name}: {role}/{container['name']}"] = container["image"]
    docker = yaml.safe_load(LAUNCHER.read_text())["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            images[f"{LAUNCHER.name}: docker.{key}"] = docker[key]
    for name, node_type in yaml.safe_load(LAUNCHER.read_text())["available_node_types"].items():
        for key, image in node_type.get("docker", {}).items():
            if key.endswith("image"):
                images[f"{LAUNCHER.name}: {name}.docker.{key}"] = image
    assert len(set(images.values())) == 1, images
    image = next(iter(images.values()))
    assert is_pinned(image), f"{image} is not pinned to a tag other than latest, or to a digest"


def test_is_pinned_tells_pinned_images_from_floating_ones():
    assert is_pinned("ghcr.io/your-org/fetaliqa:0.1.0")
    assert is_pinned("registry:5000/fetaliqa@sha256:" + "0" * 64)
    assert not is_pinned("ghcr.io/your-org/fetaliqa:latest")
    assert not is_pinned("ghcr.io/your-org/fetaliqa")
    assert not is_pinned("registry:5000/fetaliqa")


def test_dockerfile_installs_the_package_on_the_locked_stack():
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert bases and all(is_pinned(b) for b in bases), bases
    assert bases[-1].startswith(f"rayproject/ray:{locked_version('ray')}-"), bases[-1]  # Ray of the lock
    copied = [w for op, args in instructions if op == "COPY" for w in args.split()[:-1] if not w.startswith("--")]
    assert "requirements.lock" in copied
    installs = [shlex.split(args) for op, args in instructions if op == "RUN" and "pip install" in args]
    assert installs, "the Dockerfile installs nothing"
    for words in installs:
        constraints = [b for a, b in zip(words, words[1:]) if a in ("-c", "--constraint")]
        constraints += [w.split("=", 1)[1] for w in words if w.startswith("--constraint=")]
        assert constraints == ["requirements.lock"], f"pip install without -c requirements.lock: {words}"
    assert any(words[-1] == "." for words in installs), "the Dockerfile does not install this package"


def test_every_launcher_node_gets_the_auth_token_and_runs_the_image():
    text = LAUNCHER.read_text()
    config = yaml.safe_load(text)
    assert config["docker"]["image"] and config["docker"].get("pull_before_run", True)
    assert not any("docker" in t for t in config["available_node_types"].values())  # no per-type image
    mounted = set(config.get("file_mounts", {}))
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert any("--head" in c for c in starts) and any("--address" in c for c in starts)
    for command in starts:
        assert re.search(r"(^|\s)RAY_AUTH_MODE=token\s", command), command
        token = re.search(r"(?:^|\s)RAY_AUTH_TOKEN=\"?\$\(cat ([^)\s]+)\)", command)
        assert token, f"ray start without RAY_AUTH_TOKEN read from a file: {command}"
        assert token.group(1) in mounted, f"{token.group(1)} is not in file_mounts, so not on every node"
    # The token is read from a file, never written into the config.
    for value in re.findall(r"RAY_AUTH_TOKEN=(\S+)", text):
        assert value.lstrip("\"'").startswith("$"), f"a literal token in {LAUNCHER.name}: {value}"
