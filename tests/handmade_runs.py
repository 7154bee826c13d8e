"""Scoring outputs written by hand in the documented layout (fetaliqa.score.schema, README "Outputs of `score`"):
parts committed through `fetaliqa.score.ledger.write_part`, a run.json, and optionally an uncommitted part. Used
by tests/test_run_report.py and benchmarks/report_scale.py, whose reports need runs with known answers or of a
given size without scoring anything."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fetaliqa.inputs import storage
from fetaliqa.score import ledger, schema

# cases/ of issue 21's contract: the columns the scoring job appends after the earlier ones
CONTRACT_COLUMNS = [("decision", pa.string()), ("usable_sweeps", pa.list_(pa.int8())),
                    ("best_frame_image", pa.binary()), ("study_date", pa.string()), ("institution", pa.string()),
                    ("station", pa.string()), ("manufacturer", pa.string()), ("device_model", pa.string())]
CASES_SCHEMA = pa.schema([*schema.CASES_SCHEMA, *(pa.field(n, t) for n, t in CONTRACT_COLUMNS
                                                  if n not in schema.CASES_SCHEMA.names)])
EARLIER_CASES_SCHEMA = pa.schema([f for f in CASES_SCHEMA if f.name not in dict(CONTRACT_COLUMNS)])


def jpeg(seed: int, size: int = 224, quality: int = 75) -> bytes:
    """A gray size x size JPEG of speckle-like noise (about 10-16 kB at 224 and quality 75)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    speckle = rng.gamma(2.0, 40.0, (size // 2, size // 2)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(speckle).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def case_row(case_id: str, usable_sweeps: list[int], best_score: float, run_id: str, **columns) -> dict:
    """One cases/ row: `positives` one per usable sweep unless given, decision from the sweeps."""
    row = {"case_id": case_id, "frames": 120, "positives": columns.pop("positives", len(usable_sweeps)),
           "best_frame": 7, "best_sweep": usable_sweeps[0] if usable_sweeps else 1, "best_score": best_score,
           "ac_mm": None, "sweeps": 6, "note": None, "source": f"s3://archive/{case_id}.mha", "run_id": run_id,
           "decision": "usable" if usable_sweeps else "rescan", "usable_sweeps": usable_sweeps,
           "best_frame_image": None, "study_date": None, "institution": None, "station": None,
           "manufacturer": None, "device_model": None}
    row.update(columns)
    return row


def error_row(case_id: str, kind: str, run_id: str) -> dict:
    return {"case_id": case_id, "source": f"s3://archive/{case_id}.mha", "error": kind,
            "message": f"s3://archive/{case_id}.mha: {kind} ({case_id})", "run_id": run_id}


def run_record(run_id: str, task: str = "cls", cases: dict | None = None, history: list | None = None) -> dict:
    return {"run_id": run_id, "status": "complete", "started": "2026-03-01T22:00:00+00:00",
            "ended": "2026-03-02T06:00:00+00:00", "seconds": 28800.0, "input": "s3://archive/",
            "output": "s3://scores/", "checkpoint": "s3://models/ckpt", "checkpoint_id": "ckpt-0123abcd",
            "model": "fetalclip", "task": task, "versions": {"fetaliqa": "0.1.0", "ray": "2.50", "torch": "2.4"},
            "cases": cases or {"listed": 0, "skipped": 0, "scored": 0, "failed": 0, "retried": 0},
            "frames": 0, "frames_per_s": 0.0, "positives": 0, "parts": 0, "cases_per_file": 50, "notes": [],
            "history": history or []}


def write_run(output: str, run: dict, cases: list[dict], errors: list[dict] = (), frames: list[dict] | None = None,
              cases_per_part: int = 50, cases_schema: pa.Schema = CASES_SCHEMA, storage_options=None) -> None:
    """Commit `cases` (and `errors`, `frames`) as parts of `cases_per_part` cases through `ledger.write_part`, then
    write run.json. Errors go into the first part; frames with their cases'."""
    fs, root = storage.filesystem(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    run_id = run["run_id"]
    chunks = [cases[i:i + cases_per_part] for i in range(0, len(cases), cases_per_part)] or [[]]
    for index, chunk in enumerate(chunks):
        ids = {c["case_id"] for c in chunk}
        tables = {schema.CASES: pa.Table.from_pylist([{n: c.get(n) for n in cases_schema.names} for c in chunk],
                                                     schema=cases_schema)}
        part_errors = list(errors) if index == 0 else []
        if part_errors:
            tables[schema.ERRORS] = pa.Table.from_pylist(part_errors, schema=schema.ERRORS_SCHEMA)
        if frames is not None:
            rows = [{n: f.get(n) for n in schema.FRAMES_SCHEMA.names} for f in frames if f["case_id"] in ids]
            tables[schema.FRAMES] = pa.Table.from_pylist(rows, schema=schema.FRAMES_SCHEMA)
        ledger.write_part(output, f"{run_id}-{index}", tables, sorted(ids),
                          sorted({e["case_id"] for e in part_errors}), storage_options)
    fs.pipe_file(f"{root}/{schema.RUN_RECORD}", json.dumps(run).encode())


def write_uncommitted_part(output: str, run_id: str, cases: list[dict], cases_schema: pa.Schema = CASES_SCHEMA) -> str:
    """A cases/ file without a commit record (a writer that died before committing); its path."""
    fs, root = storage.filesystem(output)
    path = f"{root}/{schema.CASES}/{run_id}-99.parquet"
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(cases, schema=cases_schema), sink)
    fs.pipe_file(path, sink.getvalue())
    return path
