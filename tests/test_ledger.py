"""The commit protocol of scoring outputs: parts, commit records, resume after a crash, the run's identity,
durable local writes."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs import storage
from fetaliqa.score import ledger, record
from fetaliqa.score.lease import Lease, LeaseLostError
from fetaliqa.score.ledger import read_table
from fetaliqa.score.schema import CASES, CASES_SCHEMA, ERRORS, ERRORS_SCHEMA, FRAMES, FRAMES_SCHEMA


def part_tables(scored: list[str], failed: list[str], frames_per_case: int = 3) -> dict[str, pa.Table]:
    n = frames_per_case
    frames = pa.table({"case_id": [c for c in scored for _ in range(n)], "sweep": [1] * n * len(scored),
                       "frame": [f for _ in scored for f in range(n)], "sop_instance_uid": [None] * n * len(scored),
                       "instance_frame": [None] * n * len(scored), "score": [0.5] * n * len(scored),
                       "positive": [True] * n * len(scored), "mask_area": [None] * n * len(scored),
                       "mask_png": [None] * n * len(scored), "model": ["m"] * n * len(scored),
                       "run_id": ["r"] * n * len(scored)}, schema=FRAMES_SCHEMA)
    cases = pa.table({"case_id": scored, "frames": [n] * len(scored), "positives": [n] * len(scored),
                      "best_frame": [0] * len(scored), "best_sweep": [1] * len(scored),
                      "best_score": [0.5] * len(scored), "ac_mm": [None] * len(scored), "sweeps": [6] * len(scored),
                      "note": [None] * len(scored),
                      "source": [f"{c}.mha" for c in scored], "run_id": ["r"] * len(scored),
                      "decision": ["usable"] * len(scored), "usable_sweeps": [[1]] * len(scored),
                      "best_frame_image": [b"jpeg"] * len(scored),
                      **{k: [None] * len(scored) for k in ("study_date", "institution", "station", "manufacturer",
                                                           "device_model")}}, schema=CASES_SCHEMA)
    errors = pa.table({"case_id": failed, "source": [f"{c}.mha" for c in failed], "error": ["truncated"] * len(failed),
                       "message": [f"{c}.mha: cut" for c in failed], "run_id": ["r"] * len(failed)},
                      schema=ERRORS_SCHEMA)
    return {FRAMES: frames, CASES: cases, ERRORS: errors}


def test_only_committed_parts_are_read_and_an_absent_table_is_empty(tmp_path):
    out = str(tmp_path / "out")
    assert read_table(out, FRAMES).num_rows == 0 and read_table(out, FRAMES).schema.equals(FRAMES_SCHEMA)
    ledger.write_part(out, "r-000000", part_tables(["a", "b"], ["c"]), ["a", "b"], ["c"])
    # A writer that died after its data files and before its record: its rows do not exist.
    (tmp_path / "out" / "frames" / "r-000001.parquet").write_bytes(b"not yet committed")
    assert read_table(out, FRAMES)["case_id"].to_pylist() == ["a"] * 3 + ["b"] * 3
    assert read_table(out, CASES)["case_id"].to_pylist() == ["a", "b"]
    assert read_table(out, ERRORS)["case_id"].to_pylist() == ["c"]
    assert not list((tmp_path / "out").rglob(".*.tmp")), "a temporary file was left behind"


def test_resume_deletes_uncommitted_files_and_releases_failed_cases(tmp_path):
    out = str(tmp_path / "out")
    ledger.write_part(out, "r-000000", part_tables(["a"], ["b"]), ["a"], ["b"])
    ledger.write_part(out, "r-000001", part_tables([], ["c"]), [], ["c"])
    orphan = tmp_path / "out" / "cases" / "r-000002.parquet"
    orphan.write_bytes(b"half a part")

    state = ledger.resume(out)

    assert state.scored == {"a"} and state.retried == 2 and state.removed_files == 3  # orphan + 2 errors files
    assert not orphan.exists() and read_table(out, ERRORS).num_rows == 0
    assert read_table(out, CASES)["case_id"].to_pylist() == ["a"]
    records = ledger.load_records(out)
    assert [(r["part"], r["scored"], r["failed"]) for r in records] == [("r-000000", ["a"], [])]
    assert ledger.resume(out).scored == {"a"}  # idempotent


def test_resume_keeps_the_error_rows_of_bad_instances_of_scored_studies(tmp_path):
    """A part scored study "s" (one of its instance files, "bad.dcm", failed) and failed case "f": a retry of "f"
    must not lose the row of "bad.dcm", whose study is complete and will not be read again."""
    out = str(tmp_path / "out")
    tables = part_tables(["s"], ["f"])
    tables[ERRORS] = pa.concat_tables([tables[ERRORS], pa.table(
        {"case_id": ["bad.dcm"], "source": ["bad.dcm"], "error": ["truncated"], "message": ["bad.dcm: cut"],
         "run_id": ["r"]}, schema=ERRORS_SCHEMA)])
    ledger.write_part(out, "r-000000", tables, ["s"], ["f"])

    state = ledger.resume(out)

    assert state.scored == {"s"} and state.retried == 1
    assert read_table(out, ERRORS)["case_id"].to_pylist() == ["bad.dcm"]
    assert [p.name for p in (tmp_path / "out" / "errors").iterdir()] == ["r-000000-kept.parquet"]
    assert ledger.resume(out).retried == 0 and read_table(out, ERRORS)["case_id"].to_pylist() == ["bad.dcm"]


def test_reset_removes_every_table_the_ledger_and_the_run_record(tmp_path):
    out = str(tmp_path / "out")
    ledger.write_part(out, "r-000000", part_tables(["a"], ["b"]), ["a"], ["b"])
    record.write_record(out, {"run_id": "r"})
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    ledger.reset(out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_a_run_of_another_checkpoint_or_code_version_is_refused_naming_both(tmp_path):
    out = str(tmp_path / "out")
    meta = {"checkpoint_id": "aaaa", "model": "fetalclip-tiny", "task": "cls"}
    run = record.begin("in", out, "ckpt", meta, overwrite=False)
    record.write_record(out, run)
    assert record.begin("in", out, "ckpt", meta, overwrite=False)["history"][0]["run_id"] == run["run_id"]
    with pytest.raises(FetaliqaError) as refused:
        record.begin("in", out, "other", {**meta, "checkpoint_id": "bbbb"}, overwrite=False)
    assert "aaaa" in str(refused.value) and "bbbb" in str(refused.value) and "\n" not in str(refused.value)
    run_of_old_code = {**run, "versions": {**run["versions"], "fetaliqa": "0.0.1"}}
    record.write_record(out, run_of_old_code)
    with pytest.raises(FetaliqaError, match="0.0.1"):
        record.begin("in", out, "ckpt", meta, overwrite=False)
    assert record.begin("in", out, "other", {**meta, "checkpoint_id": "bbbb"}, overwrite=True)["history"] == []


def test_a_folder_with_parquet_files_but_no_run_record_is_not_taken_over(tmp_path):
    """An output of the older one-file-per-case layout, or a folder of someone else's tables: resuming
    into it would delete its files as uncommitted parts."""
    (tmp_path / "out" / "cases").mkdir(parents=True)
    (tmp_path / "out" / "cases" / "case-1.parquet").write_bytes(b"PAR1")
    meta = {"checkpoint_id": "aaaa", "model": "fetalclip-tiny", "task": "cls"}
    with pytest.raises(FetaliqaError, match="no run.json"):
        record.begin("in", str(tmp_path / "out"), "ckpt", meta, overwrite=False)
    assert (tmp_path / "out" / "cases" / "case-1.parquet").exists()
    assert record.begin("in", str(tmp_path / "out"), "ckpt", meta, overwrite=True)["history"] == []


def test_the_run_record_never_holds_credentials_in_urls():
    assert record.public_url("s3://AKIDEXAMPLE:s3cr3t@bucket/archive") == "s3://bucket/archive"
    assert record.public_url("/data/archive") == "/data/archive"
    assert json.dumps(record.versions())  # plain strings


def test_resume_drops_a_record_naming_a_missing_file_and_its_cases_are_scored_again(tmp_path):
    """A part committed after another run's resume swept its files (a lease lost in a race), or files deleted by
    hand: the record is deleted, its other files swept, its cases in no part, so they are scored again."""
    out = str(tmp_path / "out")
    ledger.write_part(out, "r-000000", part_tables(["a", "b"], []), ["a", "b"], [])
    ledger.write_part(out, "r-000001", part_tables(["c"], ["d"]), ["c"], ["d"])
    (tmp_path / "out" / "frames" / "r-000001.parquet").unlink()

    state = ledger.resume(out)

    assert state.scored == {"a", "b"} and state.dropped_records == 1 and state.retried == 0
    assert state.removed_files == 2  # the dropped part's cases/ and errors/ files
    assert [r["part"] for r in ledger.load_records(out)] == ["r-000000"]
    assert read_table(out, CASES)["case_id"].to_pylist() == ["a", "b"] and read_table(out, ERRORS).num_rows == 0
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.parquet")) == ["r-000000.parquet"] * 2


def test_a_part_is_not_committed_while_the_lease_names_another_run(tmp_path):
    out = str(tmp_path / "out")
    Lease(out, "other-run").take()
    with pytest.raises(LeaseLostError, match="run r lost its lease .* to run other-run"):
        ledger.write_part(out, "r-000000", part_tables(["a"], []), ["a"], [])
    assert not (tmp_path / "out" / "frames").exists() and ledger.load_records(out) == []


def test_reset_keeps_the_lease_of_the_run_resetting(tmp_path):
    out = str(tmp_path / "out")
    ledger.write_part(out, "r-000000", part_tables(["a"], ["b"]), ["a"], ["b"])
    record.write_record(out, {"run_id": "r"})
    Lease(out, "r").take()
    ledger.reset(out)
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "_fetaliqa", "_fetaliqa/lease.json"]


def test_a_local_file_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, monkeypatch):
    """What makes a commit record durable only after its files are: `put_object` returns once the bytes and the
    name are on disk."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fs, root = storage.filesystem(str(tmp_path / "out"))
    storage.put_object(fs, f"{root}/frames/p.parquet", b"rows", local=True)

    (kind, temporary), *rest = events
    assert kind == "fsync" and temporary.startswith(f"{root}/frames/.p.parquet.") and temporary.endswith(".tmp")
    assert rest == [("rename", f"{root}/frames/p.parquet"), ("fsync", f"{root}/frames")]
    assert (tmp_path / "out" / "frames" / "p.parquet").read_bytes() == b"rows"
