"""Scoring at archive scale: streamed listings and manifests, the object-store request budget, and an exact
rerun after `kill -9` of the driver on 1,000 cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli
from loopback_s3 import request_kind

from fetaliqa.errors import InputError
from fetaliqa.score import ledger
from fetaliqa.score.ledger import read_table
from fetaliqa.score.predict import ScoreFrames
from fetaliqa.inputs.listing import LISTING_SCHEMA, list_archive
from fetaliqa.score.read import CaseReader, read_case_row
from fetaliqa.score.schema import CASES, ERRORS, FRAMES
from fetaliqa.synthetic.archive import write_synthetic_archive

from jobs import score as score_job


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    """1,000 cases of 6 frames of 48 x 64 (`fetaliqa synth --frames-per-sweep 1 --height 48 --width 64`)."""
    root = tmp_path_factory.mktemp("tiny-archive")
    write_synthetic_archive(str(root), cases=1000, frames_per_sweep=1, height=48, width=64, seed=3)
    return root


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> str:
    from fetaliqa.models import DEFAULT_THRESHOLD, build_model, save_checkpoint

    model, preprocess = build_model("fetalclip-micro", "cls", seed=11)
    url = str(tmp_path_factory.mktemp("checkpoint-micro"))
    save_checkpoint(model, url, threshold=DEFAULT_THRESHOLD["cls"], preprocess=preprocess)
    return url


def test_every_manifest_format_lists_the_same_cases(tmp_path):
    uris = [f"s3://bucket/archive/case-{i:03d}.mha" for i in (3, 1, 2)]
    (tmp_path / "cases.txt").write_text("# three cases\n\ncase-003.mha\n" + "\n".join(uris[1:]) + "\n")
    (tmp_path / "cases.csv").write_text("subject,uri\n" + "".join(f"s-{i},{u}\n" for i, u in enumerate(uris)))
    pq.write_table(pa.table({"uri": uris, "site": ["a", "b", "c"]}), tmp_path / "cases.parquet")

    expected = ["case-001", "case-002", "case-003"]
    for name in ("cases.txt", "cases.csv", "cases.parquet"):
        table = list_archive(str(tmp_path / name))
        assert table["case_id"].to_pylist() == expected, name
    # A relative entry is relative to the manifest's folder.
    assert list_archive(str(tmp_path / "cases.txt"))["source"][2].as_py() == str(tmp_path / "case-003.mha")

    (tmp_path / "twice.txt").write_text("a/x.mha\nb/x.mha\n")
    with pytest.raises(InputError, match="duplicate case id 'x'"):
        list_archive(str(tmp_path / "twice.txt"))


def test_a_folder_of_symlinked_images_is_listed_like_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "links").mkdir()
    for name in ("b.mha", "a.mha"):
        (tmp_path / "data" / name).write_bytes(b"x")
        (tmp_path / "links" / name).symlink_to(tmp_path / "data" / name)
    (tmp_path / "links" / "sub.mha").mkdir()  # a folder, whatever its name, is no image
    table = list_archive(str(tmp_path / "links"))
    assert table["case_id"].to_pylist() == ["a", "b"]
    assert table["source"].to_pylist() == [str(tmp_path / "links" / n) for n in ("a.mha", "b.mha")]


def test_a_million_line_manifest_is_listed_streaming(tmp_path):
    manifest = tmp_path / "million.txt"
    with manifest.open("w") as f:
        for i in range(1_000_000):
            f.write(f"s3://screening/2026/site-{i % 97:02d}/{i:07d}.mha\n")
    tracemalloc.start()
    table = list_archive(str(manifest))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert table.num_rows == 1_000_000
    assert table["case_id"][0].as_py() == "0000000" and table["case_id"][-1].as_py() == "0999999"
    # Python objects stay a batch large (the list itself lives in Arrow buffers, ~60 MB): a listing that
    # held a Python string per line would peak above 100 MB here.
    assert peak < 40e6, f"listing held {peak / 1e6:.0f} MB of Python objects"


def test_an_s3_prefix_is_listed_page_by_page(s3_server, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True)
    names = [f"{i:05d}.mha" for i in range(1005)] + ["notes.txt", ".hidden.mha"]
    fs.pipe({f"{bucket}/prefix/{n}": b"x" for n in names})
    before = len(s3_server.requests)

    table = list_archive(f"{bucket}/prefix", {"client_kwargs": options})

    assert table.num_rows == 1005 and table["source"][0].as_py() == f"{bucket}/prefix/00000.mha"
    lists = [r for r in s3_server.requests[before:] if "list-type=2" in r.query]
    assert len(lists) == 1 + 2  # the ACOUSLIC images/ folder looked for, then two pages of 1,000 keys


def test_reads_run_one_more_than_the_cores_where_a_local_ray_has_more_cpus(ray_local, monkeypatch):
    # A one-node Ray with more logical CPUs than cores (jobs.common.init_ray gives a local Ray at least 8) would
    # run more decodes than cores; a Ray whose CPUs are the cores keeps Ray Data's own limits.
    def reader(cases: int) -> CaseReader:
        return CaseReader(pa.Table.from_pylist([{"case_id": f"c{i}", "source": f"c{i}.mha"} for i in range(cases)],
                                               schema=LISTING_SCHEMA))

    cpus = int(ray_local.cluster_resources()["CPU"])
    monkeypatch.setattr(os, "cpu_count", lambda: cpus - 2)
    assert reader(64).read_concurrency() == cpus - 1
    assert reader(2).read_concurrency() == 2  # no more than its read tasks: Ray warns of a limit it cannot reach
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert reader(64).read_concurrency() is None


def test_object_store_requests_stay_within_two_per_case(ray_local, s3_server, s3_bucket, tiny_archive,
                                                        micro_checkpoint, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True)
    images = sorted((tiny_archive / "images" / "stacked_fetal_ultrasound").iterdir())[:200]
    fs.pipe({f"{bucket}/archive/{p.name}": p.read_bytes() for p in images})
    fs.put(micro_checkpoint, f"{bucket}/checkpoint", recursive=True)
    storage_options = json.dumps({"client_kwargs": options})
    before = len(s3_server.requests)

    assert score_job.main(["--input", f"{bucket}/archive", "--checkpoint", f"{bucket}/checkpoint",
                           "--output", f"{bucket}/scores", "--storage-options", storage_options]) == 0

    requests = s3_server.requests[before:]
    kinds = Counter(request_kind(r) for r in requests)
    print(f"object-store requests for 200 cases: {len(requests)} ({dict(kinds)})")
    assert len(requests) <= 2 * 200, f"{len(requests)} requests for 200 cases: {dict(kinds)}"
    assert kinds["GET object"] >= 200 and kinds["HEAD object"] < 20, dict(kinds)
    assert kinds["create bucket"] == 0 and kinds["HEAD bucket"] == 0, dict(kinds)
    s3 = {"client_kwargs": options}
    assert read_table(f"{bucket}/scores", CASES, s3).num_rows == 200
    assert read_table(f"{bucket}/scores", FRAMES, s3).num_rows == 200 * 6


def uninterrupted_scores(archive: Path, checkpoint: str) -> dict[tuple[str, int], float]:
    """What an uninterrupted run scores: the job's own read and predict steps over every case, without Ray
    (test_score.py shows the job's scores equal these)."""
    rows = [read_case_row(c["case_id"], c["source"]) for c in list_archive(str(archive)).to_pylist()]
    scored = ScoreFrames(checkpoint, batch_size=32)({"images": [r["images"] for r in rows]})
    return {(r["case_id"], f): float(s) for r, scores in zip(rows, scored["scores"]) for f, s in enumerate(scores)}


def test_kill_9_at_any_moment_then_rerun_scores_every_case_exactly_once(tiny_archive, micro_checkpoint, tmp_path):

    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.score", "--input", str(tiny_archive), "--checkpoint", micro_checkpoint,
            "--output", str(out)]
    driver = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "_fetaliqa" / "parts"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(parts.glob("*.json"))) < 6:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    committed = _committed_once_settled(out)
    assert 100 <= len(committed) < 900, f"the driver was not killed midway ({len(committed)} cases committed)"

    result = run_cli("jobs.score", "--input", str(tiny_archive), "--checkpoint", micro_checkpoint,
                     "--output", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    # Every case in exactly one of cases/ and errors/, no (case_id, frame) twice, the uninterrupted run's frames.
    cases, errors = read_table(str(out), CASES), read_table(str(out), ERRORS)
    ids = cases["case_id"].to_pylist() + errors["case_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 1000
    expected, got = uninterrupted_scores(tiny_archive, micro_checkpoint), _keyed_scores(str(out))
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)
    # What was committed before the kill was neither decoded nor written again.
    run = json.loads((out / "run.json").read_text())
    assert run["cases"]["skipped"] == len(committed)
    assert run["cases"]["scored"] + run["cases"]["failed"] == 1000 - len(committed)
    # Files hold many cases, sorted: at most max(10, N / 50) per table and run, and nothing uncommitted left.
    for table in (FRAMES, CASES):
        files = sorted((out / table).iterdir())
        assert len(files) == len(ledger.committed_files(str(out), table))
        for run_id, n in Counter(f.name.rsplit("-", 1)[0] for f in files).items():
            assert n <= 20, f"{table}: {n} files for run {run_id}"
        for f in files:
            keys = pq.read_table(f, columns=["case_id"] + (["frame"] if table == FRAMES else [])).to_pylist()
            assert keys == sorted(keys, key=lambda k: tuple(k.values()))


def _committed_once_settled(out: Path, quiet_s: float = 3.0, limit_s: float = 60.0) -> set[str]:
    """Case ids of the commit records in `out` once no new one has appeared for `quiet_s`. A SIGKILL of the
    driver leaves its local Ray's processes to die in their own time, and a write task already running may still
    commit its part (atomically) after the driver is gone: the rerun skips what is committed when it starts."""
    deadline = time.monotonic() + limit_s
    committed = None
    while time.monotonic() < deadline:
        now = {c for r in ledger.load_records(str(out)) for c in r["scored"] + r["failed"]}
        if now == committed:
            return now
        committed = now
        time.sleep(quiet_s)
    return committed


def _keyed_scores(output: str) -> dict[tuple[str, int], float]:
    table = read_table(output, FRAMES)
    keys = list(zip(table["case_id"].to_pylist(), table["frame"].to_pylist()))
    assert len(keys) == len(set(keys)), "a (case_id, frame) row appears twice"
    return dict(zip(keys, table["score"].to_pylist()))
