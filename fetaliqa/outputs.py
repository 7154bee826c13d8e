"""The scoring output contract: three Parquet datasets under one output URL, written one case at a time.

```
<output>/frames/<case_id>.parquet   one row per frame of a scored case      (FRAMES_SCHEMA)
<output>/cases/<case_id>.parquet    one row per scored case                 (CASES_SCHEMA)
<output>/errors/<case_id>.parquet   one row per case that could not be scored (ERRORS_SCHEMA)
```
Each folder is a Parquet dataset that `pyarrow.dataset.dataset(url, format="parquet")` (or pandas, Spark,
DuckDB) reads whole. A case's `cases/` file is written last, after its `frames/` file is complete, so it
doubles as the case's completion marker: a rerun into the same output skips exactly the cases that have
one, and rewrites any other case's files under the same names, so no (case_id, frame) row can appear twice.
"""

from __future__ import annotations

import io
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from fetaliqa import storage
from fetaliqa.storage import StorageOptions

FRAMES_SCHEMA = pa.schema([
    ("case_id", pa.string()),
    ("sweep", pa.int8()),          # 1-based
    ("frame", pa.int32()),         # 0-based index in the stack
    ("score", pa.float32()),       # in [0, 1]
    ("positive", pa.bool_()),      # score >= the checkpoint's threshold
    ("mask_area", pa.int32()),     # SEG: mask pixels at native resolution; null for CLS
    ("mask_png", pa.binary()),     # SEG: PNG of the native-resolution mask where positive; else null
    ("model", pa.string()),        # checkpoint id
])

CASES_SCHEMA = pa.schema([
    ("case_id", pa.string()),
    ("frames", pa.int32()),
    ("positives", pa.int32()),
    ("best_frame", pa.int32()),
    ("best_sweep", pa.int8()),
    ("best_score", pa.float32()),
    ("ac_mm", pa.float32()),       # SEG: ellipse-fit circumference of the best frame's mask; null for CLS
    ("source", pa.string()),
])

ERRORS_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("error", pa.string()),        # short kind, e.g. "truncated", "not_an_image"
    ("message", pa.string()),      # one line naming the file and the problem
])

FRAMES, CASES, ERRORS = "frames", "cases", "errors"


def case_file(output_url: str, table: str, case_id: str) -> str:
    return storage.join(output_url, table, f"{case_id}.parquet")


def completed_case_ids(output_url: str, storage_options: StorageOptions = None) -> set[str]:
    """Ids of the cases whose `cases/` file exists under `output_url` (empty if there is no output yet)."""
    fs, path = storage.filesystem(storage.join(output_url, CASES), storage_options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {n.rsplit("/", 1)[-1][: -len(".parquet")] for n in names if n.endswith(".parquet")}


def write_table(table: pa.Table, url: str, storage_options: StorageOptions = None) -> None:
    """Write `table` to the Parquet file `url` so that readers never see a partial file.

    Object stores publish an object only when its upload completes; on a local or POSIX filesystem the
    file is written under a hidden temporary name (which Parquet dataset readers skip) and renamed.
    """
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    fs, path = storage.filesystem(url, storage_options)
    parent, name = path.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    if storage.is_local(url):
        temporary = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(temporary, buffer.getvalue())
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, buffer.getvalue())


def remove_file(url: str, storage_options: StorageOptions = None) -> None:
    """Remove `url` if it exists (a stale `errors/` file of a case that has now been scored)."""
    fs, path = storage.filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm_file(path)


def read_dataset(output_url: str, table: str, storage_options: StorageOptions = None) -> pa.Table:
    """Read one of `frames`, `cases`, `errors` whole (an empty table of the schema if absent)."""
    import pyarrow.dataset as ds

    schema = {FRAMES: FRAMES_SCHEMA, CASES: CASES_SCHEMA, ERRORS: ERRORS_SCHEMA}[table]
    fs, path = storage.filesystem(storage.join(output_url, table), storage_options)
    if not fs.exists(path):
        return schema.empty_table()
    return ds.dataset(path, filesystem=fs, format="parquet", schema=schema).to_table()
