"""What a scoring run tells its user: a progress line in the job log, and `run.json` in the output.

`run.json` (rewritten at the start and at the end of every run; never credentials nor `--storage-options`
values, and URLs as `fetaliqa.redact.public_url` gives them: without user, password or query string):
  run_id, status ("running" | "complete"), started, ended (UTC, ISO 8601), seconds, input, output,
  checkpoint, checkpoint_id, model, task, versions {fetaliqa, ray, torch}, pseudonymized (bool),
  pseudonym_key_id (`fetaliqa.pseudonym.key_id` of the run's key, never the key; null when not pseudonymized;
  when pseudonymized, `input` is its pseudonym too),
  cases {listed, skipped (complete before this run), scored, failed, retried (failed before, read again)},
  frames, frames_per_s, parts (written by this run), cases_per_file, removed_files (of parts that never
  committed), dropped_records (commit records that named a missing file: their cases scored again), notes
  (e.g. a dead run's lease taken over), stages (Ray Data's per-stage statistics, text), history (earlier
  runs' records, oldest first).
The output's identity is its `checkpoint_id` and `versions.fetaliqa`, and its pseudonym key id: `check_identity`
refuses a run that would mix another model's (or another code version's) scores into it, or another key's
pseudonyms (or identifiers in clear into a pseudonymised output, or the reverse).
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
import uuid
from importlib.metadata import PackageNotFoundError, version

import ray

from fetaliqa import __version__
from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs import storage
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.redact import public_url
from fetaliqa.score.ledger import holds_table_files
from fetaliqa.score.schema import RUN_RECORD

log = logging.getLogger("fetaliqa")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time to the second, then 6 random hex digits."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"fetaliqa": __version__, "ray": ray.__version__, "torch": installed("torch")}


def read_record(output_url: str, storage_options: StorageOptions = None) -> dict | None:
    """The output's `run.json`, or None when there is none."""
    fs, root = storage.filesystem(output_url, storage_options)
    try:
        return json.loads(fs.cat_file(f"{root}/{RUN_RECORD}"))
    except FileNotFoundError:
        return None


def write_record(output_url: str, record: dict, storage_options: StorageOptions = None) -> None:
    fs, root = storage.filesystem(output_url, storage_options)
    storage.put_object(fs, f"{root}/{RUN_RECORD}", json.dumps(record, indent=1).encode(), storage.is_local(output_url))


def check_identity(output_url: str, previous: dict | None, checkpoint_id: str, key_id: str | None = None) -> None:
    """Refuse to add scores of another checkpoint or code version to an output, or ids pseudonymised otherwise
    (`key_id`: the run's pseudonym key id, None without pseudonyms); one line naming both."""
    if previous is None:
        return
    theirs = (previous.get("checkpoint_id"), previous.get("versions", {}).get("fetaliqa"))
    ours = (checkpoint_id, __version__)
    if theirs != ours:
        raise FetaliqaError(
            f"{public_url(output_url)} holds scores of checkpoint {theirs[0]} (fetaliqa {theirs[1]}); this run's is "
            f"{ours[0]} (fetaliqa {ours[1]}): use another --output, or --overwrite to start afresh")
    their_key = previous.get("pseudonym_key_id") if previous.get("pseudonymized") else None
    if their_key != key_id:
        def says(key: str | None) -> str:
            return f"ids pseudonymised with key id {key}" if key else "ids in clear (not pseudonymised)"

        raise FetaliqaError(f"{public_url(output_url)} holds {says(their_key)}; this run would write {says(key_id)}: "
                            "use the same --pseudonymize-key-file, another --output, or --overwrite to start afresh")


@ray.remote(num_cpus=0)
class Progress:
    """Totals of the parts committed so far; write tasks `record` each part's tally."""

    def __init__(self):
        self.totals = {"cases": 0, "failed": 0, "frames": 0, "positives": 0, "parts": 0}

    def record(self, tally: dict) -> None:
        for key in ("cases", "failed", "frames", "positives"):
            self.totals[key] += tally[key]
        self.totals["parts"] += 1

    def snapshot(self) -> dict:
        return dict(self.totals)


class ProgressLog:
    """A thread that logs one progress line every `every_s` seconds while a run executes."""

    def __init__(self, progress, total_cases: int, every_s: float = 30.0):
        self.progress, self.total, self.every_s = progress, total_cases, every_s
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetaliqa-progress", daemon=True)

    def __enter__(self) -> ProgressLog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info(self.line(ray.get(self.progress.snapshot.remote())))

    def line(self, totals: dict) -> str:
        seconds = time.perf_counter() - self.started
        done = totals["cases"] + totals["failed"]
        return (f"progress: {done:,}/{self.total:,} cases ({totals['failed']:,} errors), {totals['frames']:,} frames, "
                f"{totals['frames'] / max(seconds, 1e-9):,.1f} frames/s, {seconds:,.0f} s")


def begin(input_url: str, output_url: str, checkpoint_url: str, meta: dict, overwrite: bool,
          storage_options: StorageOptions = None, key_id: str | None = None) -> dict:
    """This run's record, after checking the output's identity (unless `overwrite`); `key_id`: the pseudonym
    key's id, None when the run writes identifiers in clear."""
    previous = read_record(output_url, storage_options)
    if not overwrite:
        check_identity(output_url, previous, meta["checkpoint_id"], key_id)
        if previous is None and holds_table_files(output_url, storage_options):
            raise FetaliqaError(f"{public_url(output_url)} holds frames/, cases/ or errors/ files but no {RUN_RECORD}: "
                                "not an output of this fetaliqa; use another --output, or --overwrite to replace them")
    history = [] if overwrite or previous is None else [*previous.pop("history", []), previous]
    return {"run_id": new_run_id(), "status": "running", "started": now(), "ended": None,
            "input": public_url(input_url), "output": public_url(output_url), "checkpoint": public_url(checkpoint_url),
            "checkpoint_id": meta["checkpoint_id"], "model": meta.get("model"), "task": meta.get("task"),
            "versions": versions(), "pseudonymized": key_id is not None, "pseudonym_key_id": key_id,
            "history": history}


def finish(run: dict, listed: int, resumed, tallies: list[dict], cases_per_file: int, stages, seconds: float) -> dict:
    """`run` completed with this run's counts; `resumed` is the `ledger.ResumeState` it started from."""
    frames = sum(t["frames"] for t in tallies)
    return {**run, "status": "complete", "ended": now(), "seconds": round(seconds, 3),
            "cases": {"listed": listed, "skipped": len(resumed.scored), "scored": sum(t["cases"] for t in tallies),
                      "failed": sum(t["failed"] for t in tallies), "retried": resumed.retried},
            "frames": frames, "frames_per_s": round(frames / max(seconds, 1e-9), 1),
            "positives": sum(t["positives"] for t in tallies), "parts": len(tallies),
            "cases_per_file": cases_per_file, "removed_files": resumed.removed_files,
            "dropped_records": resumed.dropped_records, "stages": str(stages)}


def summary_line(run: dict) -> str:
    cases = run["cases"]
    return (f"fetaliqa score: {cases['scored']} cases scored ({cases['skipped']} already complete), "
            f"{run['frames']} frames in {run['seconds']:.1f} s ({run['frames_per_s']:.1f} frames/s), "
            f"{run['positives']} positive frames, {cases['failed']} errors -> {run['output']}")
