"""Shared fixtures: a real local Ray, a real S3 endpoint on loopback (moto's server mode), tiny archives
and checkpoints built with the project's own code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from loopback_s3 import LoopbackS3

REPO = Path(__file__).resolve().parents[1]
REFERENCE_FOV_MASK = REPO.parent / "shared" / "reference" / "acouslic_fov_mask.mha"

# Credentials for the loopback S3 endpoint come through the standard AWS environment chain, set before
# Ray starts so that its workers inherit them. They are moto's dummies, valid nowhere else.
S3_ENV = {"AWS_ACCESS_KEY_ID": "fetaliqa-test-key", "AWS_SECRET_ACCESS_KEY": "fetaliqa-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
os.environ.update(S3_ENV)
# Ray must not reach for a cluster a developer may have running, nor phone home.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# A local Ray started earlier in the pytest process forwards its own processes' lines to this process's
# stderr at any moment (e.g. the raylet's "disk over 95% full" warning), each prefixed with its source,
# coloured on a terminal: "(raylet)", "(raylet, ip=...)", "(pid=123)", "(ScoreFrames pid=123, ip=...)".
RAY_FORWARDED_LINE = re.compile(r"^(?:\x1b\[[\d;]*m)?\((?:raylet|[^()]*\bpid=\d+)[^()]*\)")


def own_stderr_lines(capsys) -> list[str]:
    """The lines that the code under test wrote to stderr since the last read, without Ray's forwarded ones."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if not RAY_FORWARDED_LINE.match(line)]


@pytest.fixture(scope="session")
def s3_server() -> LoopbackS3:
    """A real S3 endpoint (moto) on 127.0.0.1 for the whole session."""
    server = LoopbackS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    """URL of the loopback S3 endpoint."""
    return s3_server.url


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the loopback endpoint: (bucket URL, storage options)."""
    import s3fs

    options = {"endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    name = "fetaliqa-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs.mkdir(name)
    yield f"s3://{name}", options
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray for in-process pipeline tests (4 logical CPUs on 2 cores; see jobs.common)."""
    import ray

    from jobs.common import init_ray

    init_ray(local_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory) -> Path:
    """A synthetic ACOUSLIC-layout archive: 4 cases of 6 x 8 frames of 70 x 93 pixels."""
    from fetaliqa.synthetic.archive import write_synthetic_archive

    root = tmp_path_factory.mktemp("archive")
    write_synthetic_archive(str(root), cases=4, frames_per_sweep=8, height=70, width=93, seed=7)
    return root


def _checkpoint(tmp_path_factory, task: str) -> str:
    from fetaliqa.models import DEFAULT_THRESHOLD, build_model, save_checkpoint

    model, preprocess = build_model("fetalclip-tiny", task, seed=11)
    url = str(tmp_path_factory.mktemp(f"checkpoint-{task}"))
    save_checkpoint(model, url, threshold=DEFAULT_THRESHOLD[task], preprocess=preprocess)
    return url


@pytest.fixture(scope="session")
def cls_checkpoint(tmp_path_factory) -> str:
    return _checkpoint(tmp_path_factory, "cls")


@pytest.fixture(scope="session")
def seg_checkpoint(tmp_path_factory) -> str:
    return _checkpoint(tmp_path_factory, "seg")


def _scored(tmp_path_factory, archive: Path, checkpoint: str, name: str) -> str:
    from jobs import score as score_job

    out = str(tmp_path_factory.mktemp(name) / "scores")
    assert score_job.main(["--input", str(archive), "--checkpoint", checkpoint, "--output", out]) == 0
    return out


@pytest.fixture(scope="session")
def cls_scores(ray_local, tmp_path_factory, small_archive, cls_checkpoint) -> str:
    """`jobs.score` output of `small_archive` with `cls_checkpoint`, default flags: one run shared by the tests
    that only read it (each scoring run costs the suite ~15 s of Ray Data and actor start-up). Do not write to it."""
    return _scored(tmp_path_factory, small_archive, cls_checkpoint, "cls-scores")


@pytest.fixture(scope="session")
def seg_scores(ray_local, tmp_path_factory, small_archive, seg_checkpoint) -> str:
    """The same with `seg_checkpoint`. Do not write to it."""
    return _scored(tmp_path_factory, small_archive, seg_checkpoint, "seg-scores")


def assert_decisions_follow_the_frames(cases, frames) -> None:
    """Each case's `decision` and `usable_sweeps` in a run's `cases/` table are what its positive frames in its
    `frames/` table say."""
    usable: dict[str, set[int]] = {}
    for case_id, sweep, positive in zip(*(frames[c].to_pylist() for c in ("case_id", "sweep", "positive"))):
        usable.setdefault(case_id, set()).update({sweep} if positive else set())
    for case in cases.to_pylist():
        assert case["usable_sweeps"] == sorted(usable[case["case_id"]])
        assert case["decision"] == ("usable" if usable[case["case_id"]] else "rescan")


def damage_state_dict(state: dict, key: str, damage: str) -> dict:
    """`state` with `key` removed, renamed (an 's' appended) or reshaped (one row short), in place."""
    if damage == "remove":
        del state[key]
    elif damage == "rename":
        state[key + "s"] = state.pop(key)
    else:
        state[key] = state[key][:-1]
    return state


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in a fresh process (from the repository root by default), as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
