"""A real two-node Ray cluster on loopback, token authentication on: `ray job submit` of the scoring job, the
refusal of local paths that other nodes cannot see, and a run whose worker node dies midway."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import REPO, run_cli
from loopback_s3 import free_port

from fetaliqa.inputs.listing import list_cases
from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.score.ledger import read_table
from fetaliqa.score.schema import ERRORS, FRAMES

RAY = str(Path(sys.executable).with_name("ray"))


def node_ports() -> list[str]:
    """Ports that two Ray nodes on one machine would otherwise both take by default."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + one worker node, each `ray start --block` in its own process group, stopped by group id."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # Ray puts AF_UNIX sockets under its temp dir, whose paths must stay under 108 bytes: pytest's are too deep.
    temp_dir = Path(tempfile.mkdtemp(prefix="fqray-", dir="/tmp"))
    head = ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(dashboard_port), "--num-cpus", "2", "--temp-dir", str(temp_dir)]
    worker = ["--address", f"127.0.0.1:{gcs_port}", "--num-cpus", "2", "--resources", '{"decode": 2}']
    nodes = []
    try:
        for flags in (head, worker):
            command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", *flags, *node_ports()]
            nodes.append(subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for_nodes(len(nodes), gcs_port, env)
        wait_for_http(f"http://127.0.0.1:{dashboard_port}/api/version")
        yield {"dashboard": f"http://127.0.0.1:{dashboard_port}", "env": env, "temp_dir": temp_dir,
               "address": f"127.0.0.1:{gcs_port}", "worker": nodes[1]}
    finally:
        for node in reversed(nodes):
            stop_group(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_nodes(count: int, gcs_port: int, env: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{gcs_port}"], env=env,
                                capture_output=True, text=True)
        active = status.stdout.split("Pending:")[0] if "Pending:" in status.stdout else ""
        if len(re.findall(r"^\s*1 node_", active, flags=re.M)) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray node(s) did not come up: {status.stdout[-2000:]} {status.stderr[-2000:]}")


def wait_for_http(url: str, timeout: float = 120) -> None:
    """Wait until the dashboard (which serves the Jobs API) answers at all; 401 without a token counts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard did not answer at {url}")


def stop_group(process: subprocess.Popen) -> None:
    """Stop one `ray start --block` and everything it started: only what this test started.

    SIGTERM goes to `ray start` alone, which stops its node in order; signalling the whole group would
    kill the GCS first and leave `ray start` waiting 30 s to drain through it. SIGKILL to the process
    group is the fallback.
    """
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def test_ray_job_submit_scores_an_archive_on_a_two_node_cluster(cluster, small_archive, cls_checkpoint, tmp_path):
    out = tmp_path / "out"
    submission_id = f"fetaliqa-test-{secrets.token_hex(4)}"
    # Both nodes run on this machine, so its disk is a filesystem every node mounts alike.
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", cluster["dashboard"], "--submission-id", submission_id,
         "--working-dir", ".", "--", "python", "-m", "jobs.score", "--input", str(small_archive),
         "--checkpoint", cls_checkpoint, "--output", str(out), "--actors", "2", "--shared-filesystem"],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = subprocess.run([RAY, "job", "status", "--address", cluster["dashboard"], submission_id],
                            env=cluster["env"], capture_output=True, text=True)
    assert f"Job '{submission_id}' succeeded" in status.stdout, status.stdout + status.stderr
    assert "4 cases scored" in submit.stdout

    expected = sum(read_image_stack(c.source).frames.shape[0] for c in list_cases(str(small_archive)))
    assert read_table(str(out), FRAMES).num_rows == expected

    # The uploaded working dir honours .gitignore: no virtualenv, a small package.
    packages = list((cluster["temp_dir"]).glob("session_*/runtime_resources/working_dir_files/*"))
    assert packages, "no working-dir package found on the head node"
    for package in packages:
        assert not (package / ".venv").exists()
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        assert size < 5_000_000, f"working dir upload is {size} bytes"


def test_submitting_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(cluster["temp_dir"])  # no ~/.ray/auth_token to fall back on
    submit = subprocess.run([RAY, "job", "list", "--address", cluster["dashboard"]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert submit.returncode != 0


def test_local_paths_on_two_nodes_are_refused_before_anything_is_written(cluster, small_archive, cls_checkpoint, tmp_path):
    out = tmp_path / "out"
    run = run_cli("jobs.score", "--input", str(small_archive), "--checkpoint", cls_checkpoint, "--output", str(out),
                  env={**cluster["env"], "RAY_ADDRESS": cluster["address"]})
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert errors == [f"python -m jobs.score: error: --input {small_archive}, --checkpoint {cls_checkpoint}, "
                      f"--output {out}: local path(s) on a cluster of 2 nodes, where each node would read and write "
                      "its own disk; use object storage (s3://..., gs://...), or --shared-filesystem when every node "
                      "mounts these paths"], run.stderr[-2000:]
    assert not out.exists()


# Last in this module: it leaves the cluster with its head alone.
def test_a_run_whose_worker_node_dies_midway_completes_or_its_rerun_does_exactly(cluster, cls_checkpoint, tmp_path):
    from fetaliqa.synthetic.archive import write_synthetic_archive

    archive, out = tmp_path / "archive", tmp_path / "out"
    write_synthetic_archive(str(archive), cases=24, frames_per_sweep=6, height=48, width=64, seed=2)
    command = [sys.executable, "-m", "jobs.score", "--input", str(archive), "--checkpoint", cls_checkpoint,
               "--output", str(out), "--cases-per-file", "1", "--shared-filesystem"]
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts = out / "_fetaliqa" / "parts"
    deadline = time.monotonic() + 300
    while driver.poll() is None and not (parts.exists() and any(parts.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed_midway = driver.poll() is None
    raylets = [p for p in psutil.Process(cluster["worker"].pid).children(recursive=True) if p.name() == "raylet"]
    assert raylets, "the worker node's raylet was not found"
    for raylet in raylets:
        raylet.kill()  # SIGKILL: the node is gone without a word
    log = driver.communicate(timeout=600)[0]
    if driver.returncode != 0:  # the run may fail with its node: the rerun on the head alone must finish it
        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert killed_midway, log[-3000:]

    frames = read_table(str(out), FRAMES)
    keys = list(zip(frames["case_id"].to_pylist(), frames["frame"].to_pylist()))
    assert len(keys) == len(set(keys)) == 24 * 6 * 6
    assert read_table(str(out), ERRORS).num_rows == 0
