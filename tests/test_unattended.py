"""A night nobody watches: a read worker that dies on every attempt costs its cases, not the run; paths that a
cluster's other nodes cannot see are refused before anything is written."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli

from fetaliqa.inputs.listing import list_cases
from fetaliqa.score.ledger import read_table
from fetaliqa.score.read import KILL_READ_ENV
from fetaliqa.score.schema import CASES, ERRORS, FRAMES

from jobs import common
from jobs import score as score_job


def frame_keys(output: str) -> list[tuple[str, int]]:
    table = read_table(output, FRAMES)
    return list(zip(table["case_id"].to_pylist(), table["frame"].to_pylist()))


def test_a_case_that_kills_its_read_worker_every_time_costs_its_task_not_the_run(tmp_path, cls_checkpoint):
    from fetaliqa.synthetic.archive import write_synthetic_archive

    archive, out = tmp_path / "archive", str(tmp_path / "out")
    # 40 cases on a local Ray of 8 logical CPUs: 32 read tasks, some of two cases, so a death can take a neighbour.
    write_synthetic_archive(str(archive), cases=40, frames_per_sweep=2, height=32, width=40, seed=5)
    ids = sorted(c.case_id for c in list_cases(str(archive)))
    poison = {ids[9], ids[30]}
    args = ("jobs.score", "--input", str(archive), "--checkpoint", cls_checkpoint, "--output", out)

    first = run_cli(*args, env={KILL_READ_ENV: ",".join(poison)}, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "lost with workers that died on every attempt" in first.stderr
    errors = read_table(out, ERRORS)
    assert set(errors["error"].to_pylist()) == {"worker_died"}
    died = set(errors["case_id"].to_pylist())
    scored = set(read_table(out, CASES)["case_id"].to_pylist())
    assert poison <= died and len(died) <= 2 * len(poison)  # the poisoned cases and at most their task's others
    assert scored | died == set(ids) and not scored & died
    assert all(message.startswith(str(archive)) and "failed on every attempt" in message
               for message in errors["message"].to_pylist())
    keys = frame_keys(out)
    assert len(keys) == len(set(keys)) and {case for case, _ in keys} == scored
    run = json.loads(open(os.path.join(out, "run.json")).read())
    assert run["status"] == "complete" and run["cases"]["failed"] == len(died)
    assert run["cases"]["scored"] == len(scored)

    # The rerun retries exactly the lost cases; each case ends with its frames once, and no errors remain.
    second = run_cli(*args, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    run = json.loads(open(os.path.join(out, "run.json")).read())
    assert run["cases"]["retried"] == len(died) and run["cases"]["skipped"] == len(scored)
    assert read_table(out, ERRORS).num_rows == 0
    assert set(read_table(out, CASES)["case_id"].to_pylist()) == set(ids)
    keys = frame_keys(out)
    assert len(keys) == len(set(keys)) == 40 * 6 * 2


def test_local_paths_are_made_absolute_and_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = score_job.build_parser().parse_args(["--input", "archive", "--checkpoint", "file:///ckpt",
                                                "--output", "s3://bucket/out"])
    common.absolute_local_paths(args, ("input", "checkpoint", "output"))
    assert (args.input, args.checkpoint, args.output) == (str(tmp_path / "archive"), "file:///ckpt", "s3://bucket/out")


def test_a_single_node_with_cpus_accepts_local_paths(ray_local, tmp_path):
    common.check_paths_reach_every_node({"input": str(tmp_path), "output": str(tmp_path / "out")}, False)


@pytest.mark.parametrize("shared", [False, True])
def test_a_driver_node_without_cpus_refuses_local_paths_unless_shared(ray_local, monkeypatch, tmp_path, shared):
    # Ray's own view of the cluster, edited as a head started with `--num-cpus 0` reports itself.
    nodes = ray_local.nodes()
    monkeypatch.setattr(common.ray, "nodes", lambda: [n | {"Resources": {**n["Resources"], "CPU": 0}} for n in nodes])
    paths = {"input": "s3://bucket/archive", "output": str(tmp_path / "out")}
    if shared:
        common.check_paths_reach_every_node(paths, True)
        return
    with pytest.raises(common.FetaliqaError, match=r"^--output /\S+/out: local path\(s\) on a cluster whose driver "
                                                   r"node has no CPU.*--shared-filesystem"):
        common.check_paths_reach_every_node(paths, False)
