"""The commit protocol of a scoring output: which parts are complete, and resuming after any failure.

A write task stages nothing: it writes its part's files under their final names (`frames/<part>.parquet`,
`cases/...`, `errors/...`; on a local filesystem through a hidden temporary file and a rename), and then
its commit record `_fetaliqa/parts/<part>.json`, which names the files and the case ids the part scored
and failed (with a failed DICOM study, the URIs of its bad instances, whose rows are retried with
it). The record is the commit: one object PUT, atomic on every object store (a rename on a local
filesystem). A part without a record does not exist:

- `read_table` reads only the files that records name;
- `resume` (the start of every run into an existing output) deletes every commit record that names a missing
  file (its cases are then in no part, and are scored again; see below), deletes every table file that no
  record names (a part whose writer died before its record), retries the failed cases of earlier runs (their
  records are rewritten without them first, then their `errors/` files deleted, so a crash in between
  leaves only an unnamed file for the next start to delete; `errors/` rows of a part that are not its failed
  cases', bad instances of DICOM studies it scored, are first copied to a file the new record names), and
  returns the ids already scored.

So after `kill -9` of the driver, or the loss of any worker, at any moment, rerunning the same command
scores each case exactly once: a case is in exactly one committed part, never decoded again once
committed, and its frames are those an uninterrupted run writes. Part names are deterministic per write
task (`<run_id>-<task index>`), so a write task that Ray retries overwrites its own files.

Durability: on a local filesystem every file and record is fsynced, then its folder, before the next is
written (`storage.put_object`), so after a power loss a record never names an empty or absent file.

One run at a time: a run holds the output's lease (`fetaliqa.score.lease`, `_fetaliqa/lease.json`) from before
its `reset` or `resume` until it ends, and `write_part` commits nothing while the lease names another run. A
second run, or `--overwrite`, is refused while the first is alive; it would otherwise delete the first's
uncommitted files, whose records the first would then commit. Should a record still name a missing file (a
part committed by a run just as its lease was taken over, or files deleted by hand), `resume` deletes that
record: its cases are scored again and committed in the new part only, so a case stays in exactly one part.
`reset` keeps the lease of the run that resets.

Why not `ray.data.checkpoint`: it tracks the rows of one Write; a run writes three tables whose parts
must commit together (a case is in `cases/` or `errors/` with its frames, or nowhere), and its filter
runs on the rows a Read yields, which here are decoded cases: a complete case would be decoded again
before being dropped.

Object-store requests: a commit costs a GET of the lease, one PUT per non-empty table file plus one for the
record; a start costs a LIST of the records, a GET each (batched), and a LIST per table; the lease a PUT to take,
one per heartbeat, a DELETE to release.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from fetaliqa.inputs import storage
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.score import lease
from fetaliqa.score.schema import ERRORS_SCHEMA, LEDGER_DIR, ROW_GROUP_ROWS, RUN_RECORD, SCHEMAS, TABLES, part_name

PARTS_DIR = f"{LEDGER_DIR}/parts"


@dataclass
class ResumeState:
    """What an output already holds when a run starts."""

    scored: set[str] = field(default_factory=set)   # case ids in committed parts: skipped
    retried: int = 0                                # failed cases of earlier runs, to be read again
    removed_files: int = 0                          # table files of parts that never committed
    dropped_records: int = 0                        # commit records naming a missing file: their cases rescored


def write_part(output_url: str, part: str, tables: dict[str, pa.Table], scored: list[str], failed: list[str],
               storage_options: StorageOptions = None) -> dict:
    """Write a part's non-empty tables, then its commit record; returns the record. `LeaseLostError`, writing
    nothing, when the output's lease names another run than the part's (`<run_id>-<task index>`)."""
    lease.check(output_url, part.rsplit("-", 1)[0], storage_options)
    fs, root = storage.filesystem(output_url, storage_options)
    local = storage.is_local(output_url)
    files = {}
    for table, rows in tables.items():
        if rows.num_rows:
            files[table] = f"{table}/{part_name(part)}"
            storage.put_object(fs, f"{root}/{files[table]}", _parquet_bytes(rows), local)
    record = {"part": part, "files": files, "scored": scored, "failed": failed}
    storage.put_object(fs, f"{root}/{PARTS_DIR}/{part}.json", json.dumps(record).encode(), local)
    return record


def committed_files(output_url: str, table: str, storage_options: StorageOptions = None) -> list[str]:
    """Paths (relative to `output_url`) of the committed files of `table`, sorted."""
    return sorted(r["files"][table] for r in load_records(output_url, storage_options) if table in r["files"])


def load_records(output_url: str, storage_options: StorageOptions = None) -> list[dict]:
    """Every commit record under `output_url` (none when there is no output yet)."""
    fs, root = storage.filesystem(output_url, storage_options)
    paths = [p for p in _ls(fs, f"{root}/{PARTS_DIR}") if p.endswith(".json")]
    if not paths:
        return []
    contents = fs.cat(paths)
    return [json.loads(contents[p]) for p in sorted(contents)]


def resume(output_url: str, storage_options: StorageOptions = None) -> ResumeState:
    """Make `output_url` hold committed parts only, release failed cases for retry; see the module docstring."""
    fs, root = storage.filesystem(output_url, storage_options)
    local = storage.is_local(output_url)
    state = ResumeState()
    present = [p for table in TABLES for p in _ls(fs, f"{root}/{table}")]
    named, existing = set(), set(present)
    for record in load_records(output_url, storage_options):
        if any(f"{root}/{f}" not in existing for f in record["files"].values()):
            fs.rm(f"{root}/{PARTS_DIR}/{record['part']}.json")  # its other files are swept below as unnamed
            state.dropped_records += 1
            continue
        if record["failed"]:
            state.retried += len(record["failed"])
            kept = _errors_of_others(fs, root, record, local)
            files = {t: f for t, f in record["files"].items() if t != "errors"} | kept
            record = {**record, "files": files, "failed": []}
            path = f"{root}/{PARTS_DIR}/{record['part']}.json"
            if record["scored"] or kept:
                storage.put_object(fs, path, json.dumps(record).encode(), local)
            else:
                fs.rm(path)
        state.scored.update(record["scored"])
        named.update(f"{root}/{f}" for f in record["files"].values())
    unnamed = [p for p in present if p not in named]
    if unnamed:
        fs.rm(unnamed)
    state.removed_files = len(unnamed)
    return state


def _errors_of_others(fs, root: str, record: dict, local: bool) -> dict[str, str]:
    """Keep the `errors/` rows of a part that are not its failed cases' (bad instances of DICOM studies the
    part scored, which are not read again): written to a new file, {"errors": its path}, or {} when none.

    The new file is named by the rewritten record; the old one, then unnamed, is deleted by `resume`'s sweep.
    """
    if "errors" not in record["files"]:
        return {}
    table = pq.read_table(fs.open(f"{root}/{record['files']['errors']}", "rb"))
    failed = pa.array(record["failed"], pa.string())
    others = table.filter(pc.invert(pc.is_in(table["case_id"], failed)))
    if not others.num_rows:
        return {}
    kept = f"errors/{part_name(record['part'] + '-kept')}"
    storage.put_object(fs, f"{root}/{kept}", _parquet_bytes(others), local)
    return {"errors": kept}


def holds_table_files(output_url: str, storage_options: StorageOptions = None) -> bool:
    fs, root = storage.filesystem(output_url, storage_options)
    return any(_ls(fs, f"{root}/{table}") for table in TABLES)


def reset(output_url: str, storage_options: StorageOptions = None) -> None:
    """Delete everything a scoring run writes under `output_url` (`--overwrite`) but the lease (of the run
    resetting it)."""
    fs, root = storage.filesystem(output_url, storage_options)
    ledger = f"{root}/{LEDGER_DIR}"
    try:
        in_ledger = [p for p in fs.ls(ledger, detail=False, refresh=True) if p != f"{root}/{lease.LEASE}"]
    except FileNotFoundError:
        in_ledger = []
    for path in (*(f"{root}/{name}" for name in (*TABLES, RUN_RECORD)), *in_ledger):
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
    if storage.is_local(output_url):
        with contextlib.suppress(OSError):  # not empty: it holds the lease
            os.rmdir(ledger)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return sink.getvalue().to_pybytes()


def _ls(fs, path: str) -> list[str]:
    """Paths of the files directly in `path`, [] when it does not exist.

    `refresh=True`: the driver's filesystem instance caches listings, and workers write meanwhile.
    """
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return [e["name"] for e in entries if e["type"] == "file"]


def record_lost_cases(output_url: str, run_id: str, todo: pa.Table, storage_options: StorageOptions = None) -> int:
    """Commit an `errors/` row (kind `worker_died`) for each case of `todo` (`case_id`, `source` columns) that no
    part of run `run_id` committed: a read worker that died on every attempt (killed for memory, a crashing
    decoder) takes its task's cases with it, and Ray Data, told to tolerate lost blocks, goes on with the rest.
    The rows are an ordinary part's failed cases, so the next run reads them again. Returns how many there were.
    """
    done = set()
    for record in load_records(output_url, storage_options):
        if record["part"].startswith(f"{run_id}-"):
            done.update(record["scored"], record["failed"])
    lost = todo.filter(pc.invert(pc.is_in(todo["case_id"], pa.array(sorted(done), pa.string()))))
    if not lost.num_rows:
        return 0
    sources = lost["source"].to_pylist()
    errors = pa.table({
        "case_id": lost["case_id"], "source": lost["source"], "error": pa.repeat("worker_died", lost.num_rows),
        "message": [f"{source}: lost: the task holding it failed on every attempt (its worker killed for memory, a "
                    "crashing decoder, a lost node); the next run retries it" for source in sources],
        "run_id": pa.repeat(run_id, lost.num_rows)}, schema=ERRORS_SCHEMA)
    write_part(output_url, f"{run_id}-lost", {"errors": errors}, [], lost["case_id"].to_pylist(), storage_options)
    return lost.num_rows


def read_table(output_url: str, table: str, storage_options: StorageOptions = None) -> pa.Table:
    """Read one of `frames`, `cases`, `errors` whole, committed parts only (an empty table if none).

    Files of an interrupted run that no commit record names are left out, so this reads a consistent
    output even before a rerun has cleaned them up.
    """
    schema = SCHEMAS[table]
    files = committed_files(output_url, table, storage_options)
    if not files:
        return schema.empty_table()
    fs, root = storage.filesystem(output_url, storage_options)
    paths = [f"{root}/{f}" for f in files]  # the ledger's names are relative, '/'-separated
    return ds.dataset(paths, filesystem=fs, format="parquet", schema=schema).to_table()
