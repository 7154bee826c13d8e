"""One live run per output: the lease in `_fetaliqa/`, on a local disk and on S3 (moto over HTTP)."""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import own_stderr_lines

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs import storage
from fetaliqa.models import load_checkpoint
from fetaliqa.score import lease, ledger, record
from fetaliqa.score.lease import LEASE, Lease, LeaseHeldError, LeaseLostError
from jobs import score as score_job


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, dict | None]:
    """(output URL, storage options) on a local disk or in a fresh bucket of the loopback S3 endpoint.
    Tests using it have names of 40 characters or more: `s3_bucket` names its bucket after their first 40."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/out", options


def lease_on_disk(url: str, options) -> dict | None:
    fs, root = storage.filesystem(url, options)
    try:
        return json.loads(fs.cat_file(f"{root}/{LEASE}"))
    except FileNotFoundError:
        return None


def write_lease(url: str, options, holder: dict) -> None:
    """A lease as another process would have left it."""
    fs, root = storage.filesystem(url, options)
    if storage.is_local(url):
        os.makedirs(f"{root}/_fetaliqa", exist_ok=True)
    fs.pipe_file(f"{root}/{LEASE}", json.dumps(holder).encode())


def holder(run_id: str, pid: int, pid_started: float, heartbeat_age_s: float = 0.0, host: str | None = None) -> dict:
    beat = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=heartbeat_age_s)
    return {"run_id": run_id, "host": host or socket.gethostname(), "pid": pid, "pid_started": pid_started,
            "since": "2030-01-01T00:00:00.000+00:00", "heartbeat": beat.isoformat(timespec="milliseconds")}


def test_a_lease_is_taken_exclusively_and_a_second_run_is_refused_naming_its_holder(output):
    url, options = output
    first = Lease(url, "run-first", options)
    assert first.take() is None
    assert lease_on_disk(url, options)["run_id"] == "run-first"

    with pytest.raises(LeaseHeldError) as refused:
        Lease(url, "run-second", options).take()
    line = str(refused.value)
    assert "run-first" in line and socket.gethostname() in line and f"pid {os.getpid()}" in line
    assert f"since {lease_on_disk(url, options)['since']}" in line and "\n" not in line
    assert lease_on_disk(url, options)["run_id"] == "run-first"

    first.release()
    assert lease_on_disk(url, options) is None
    assert Lease(url, "run-second", options).take() is None


def test_a_lease_whose_heartbeat_stopped_is_taken_over_and_its_holder_learns_it(output, monkeypatch):
    url, options = output
    hung = Lease(url, "run-hung", options)
    real_now = lease.now
    monkeypatch.setattr(lease, "now", lambda: real_now() - datetime.timedelta(minutes=10))
    hung.take()  # its last heartbeat, 10 minutes ago: it hung since
    monkeypatch.setattr(lease, "now", real_now)

    note = Lease(url, "run-new", options).take()

    assert "run-hung" in note and "heartbeat is 600 s old" in note
    assert lease_on_disk(url, options)["run_id"] == "run-new"
    with pytest.raises(LeaseLostError, match="run-hung lost its lease .* to run run-new"):
        hung.refresh()  # the hung run wakes up: its conditional heartbeat fails
    assert hung.lost and "run-new" in hung.lost
    hung.release()  # deletes nothing that is not its own
    assert lease_on_disk(url, options)["run_id"] == "run-new"
    with pytest.raises(LeaseLostError, match="run run-new"):
        lease.check(url, "run-hung", options)  # what `ledger.write_part` asks before each part


def test_a_lease_of_a_process_that_is_gone_from_this_host_is_taken_over_at_once(output):
    url, options = output
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = psutil.Process(process.pid).create_time()
    process.kill()
    process.wait()
    write_lease(url, options, holder("run-killed", process.pid, started))

    note = Lease(url, "run-rerun", options).take()

    assert "run-killed" in note and f"process {process.pid} on this host is gone" in note
    assert lease_on_disk(url, options)["run_id"] == "run-rerun"


def test_a_pid_reused_by_another_process_or_a_live_holder_elsewhere_is_judged_right():
    me = psutil.Process()
    assert lease.dead_because(holder("r", me.pid, me.create_time())) is None  # alive: same pid, same start
    assert "is gone" in lease.dead_because(holder("r", me.pid, me.create_time() - 100))  # the pid was reused
    # On another host the process table says nothing: only the heartbeat counts.
    assert lease.dead_because(holder("r", 1, 0.0, host="elsewhere")) is None
    assert "heartbeat" in lease.dead_because(holder("r", 1, 0.0, heartbeat_age_s=lease.TIMEOUT_S + 5, host="elsewhere"))


def test_the_heartbeat_refreshes_the_lease_and_it_is_released_even_on_an_exception(output):
    url, options = output
    held = Lease(url, "run-beating", options, heartbeat_s=0.05)
    held.take()
    taken = lease_on_disk(url, options)
    with held.hold():
        deadline = time.monotonic() + 60
        while lease_on_disk(url, options)["heartbeat"] == taken["heartbeat"] and time.monotonic() < deadline:
            time.sleep(0.05)
        beaten = lease_on_disk(url, options)
        assert beaten["heartbeat"] > taken["heartbeat"] and beaten["since"] == taken["since"]
    assert lease_on_disk(url, options) is None

    failing = Lease(url, "run-failing", options)
    failing.take()
    with pytest.raises(RuntimeError, match="a bug"), failing.hold():
        raise RuntimeError("a bug")
    assert lease_on_disk(url, options) is None


def test_a_second_score_run_or_overwrite_against_a_live_lease_is_refused_and_deletes_nothing(
        ray_local, small_archive, cls_checkpoint, tmp_path, capsys):
    """Held from this test (no second Ray run needed): what a detached `ray job submit` still running holds.
    `ray_local`: the job joins a local Ray (to check its paths) before it reaches the lease."""
    from test_ledger import part_tables

    out = str(tmp_path / "out")
    meta = load_checkpoint(cls_checkpoint)[1]
    record.write_record(out, record.begin(str(small_archive), out, cls_checkpoint, meta, overwrite=False))
    ledger.write_part(out, "r-000000", part_tables(["a"], []), ["a"], [])
    in_flight = tmp_path / "out" / "frames" / "live-000001.parquet"  # the live run's part, not yet committed
    in_flight.write_bytes(b"being written")
    live = Lease(out, "20300101T000000-abcdef")
    live.take()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    capsys.readouterr()

    for extra in ([], ["--overwrite"]):
        argv = ["--input", str(small_archive), "--checkpoint", cls_checkpoint, "--output", out, *extra]
        assert score_job.main(argv) == 2
        err = own_stderr_lines(capsys)
        assert len(err) == 1 and "20300101T000000-abcdef" in err[0], err
        assert f"since {lease_on_disk(out, None)['since']}" in err[0]
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before
        assert in_flight.read_bytes() == b"being written"
    live.release()


def test_a_filesystem_without_hard_links_refuses_the_lease_in_one_line(tmp_path, monkeypatch):
    def no_hard_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")  # what link(2) answers on such a mount

    monkeypatch.setattr(os, "link", no_hard_links)
    with pytest.raises(FetaliqaError) as refused:
        Lease(str(tmp_path / "out"), "run-1").take()
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / "out") in message and "hard links" in message
    assert os.listdir(tmp_path / "out" / "_fetaliqa") == []  # its temporary file is not left behind
