"""The scoring output contract: three Parquet datasets and a run record under one output URL.

```
<output>/frames/<part>.parquet     one row per frame of a scored case          (FRAMES_SCHEMA)
<output>/cases/<part>.parquet      one row per scored case                     (CASES_SCHEMA)
<output>/errors/<part>.parquet     one row per case that could not be scored   (ERRORS_SCHEMA)
<output>/run.json                  what ran: checkpoint id, versions, counts, times (`fetaliqa.score.record`)
<output>/_fetaliqa/parts/<part>.json   commit records, one per part (`fetaliqa.score.ledger`)
```
With `--pseudonymize-key-file` (`fetaliqa.pseudonym`), every identifier in these (`case_id`, `source`,
`sop_instance_uid`, `institution`, `station`, and those inside `note` and `message`) is its keyed pseudonym
"p<32 hex>", `study_date` is YYYY-MM, and `run.json` says so (`pseudonymized`, `pseudonym_key_id`).

A part is what one write task commits: the rows of many cases (up to `--cases-per-file`), one file per
table, rows sorted by case_id then frame. `<part>` is `<run_id>-<task index>`. Each folder is a Parquet
dataset that pyarrow, pandas, DuckDB or Spark read whole (`_`- and `.`-prefixed paths are not part of it).
"""

from __future__ import annotations

import pyarrow as pa

from fetaliqa.inputs import storage
from fetaliqa.inputs.storage import StorageOptions

FRAMES_SCHEMA = pa.schema([
    ("case_id", pa.string()),
    ("sweep", pa.int8()),          # 1-based
    ("frame", pa.int32()),         # 0-based index in the stack (DICOM: over the study's frames in sweep order)
    ("sop_instance_uid", pa.string()),  # DICOM: the SOP Instance UID of the frame's instance; null for stacked images
    ("instance_frame", pa.int32()),  # DICOM: 0-based index within that instance; null for stacked images
    ("score", pa.float32()),       # in [0, 1]
    ("positive", pa.bool_()),      # score >= the checkpoint's threshold
    ("mask_area", pa.int32()),     # SEG: mask pixels at native resolution; null for CLS
    ("mask_png", pa.binary()),     # SEG: PNG of the native-resolution mask where positive; else null
    ("model", pa.string()),        # checkpoint id
    ("run_id", pa.string()),       # the run (attempt) that wrote the row; see run.json
])

CASES_SCHEMA = pa.schema([
    ("case_id", pa.string()),
    ("frames", pa.int32()),
    ("positives", pa.int32()),
    ("best_frame", pa.int32()),
    ("best_sweep", pa.int8()),
    ("best_score", pa.float32()),
    ("ac_mm", pa.float32()),       # SEG: ellipse-fit circumference of the best frame's mask; null for CLS
    ("sweeps", pa.int8()),         # sweeps scored (DICOM: the study's multi-frame instances that were read)
    ("note", pa.string()),         # e.g. why ac_mm is null (no pixel spacing), frames not cropped; else null
    ("source", pa.string()),       # the image's URI (DICOM: the first sweep's instance)
    ("run_id", pa.string()),
    ("decision", pa.string()),     # "usable": some frame positive (score >= the checkpoint's threshold); else "rescan"
    ("usable_sweeps", pa.list_(pa.int8())),  # 1-based sweeps holding a positive frame, ascending ([] for rescan)
    ("best_frame_image", pa.binary()),  # JPEG (<= 16 kB) of frame best_frame as the model saw it: S x S (the
                                   # checkpoint's image_size, 224); CLS gray; SEG BGR with the predicted mask's outline
                                   # (1 px, yellow) when the mask is not empty
    # A DICOM study's context, from the header of its first instance read; null for stacked images, and when absent
    ("study_date", pa.string()),   # StudyDate as YYYY-MM-DD (pseudonymised runs: YYYY-MM); null when not a valid date
    ("institution", pa.string()),  # InstitutionName (0008,0080)
    ("station", pa.string()),      # StationName (0008,1010)
    ("manufacturer", pa.string()),  # Manufacturer (0008,0070)
    ("device_model", pa.string()),  # ManufacturerModelName (0008,1090): the device's, not the checkpoint's `model`
])

ERRORS_SCHEMA = pa.schema([
    ("case_id", pa.string()),      # the file name without its image suffix (a failed DICOM study: its UID)
    ("source", pa.string()),
    ("error", pa.string()),        # short kind, e.g. "truncated", "not_an_image"
    ("message", pa.string()),      # one line naming the file and the problem
    ("run_id", pa.string()),
])

FRAMES, CASES, ERRORS = "frames", "cases", "errors"
TABLES = (FRAMES, CASES, ERRORS)
SCHEMAS = {FRAMES: FRAMES_SCHEMA, CASES: CASES_SCHEMA, ERRORS: ERRORS_SCHEMA}
RUN_RECORD = "run.json"
LEDGER_DIR = "_fetaliqa"

# Row groups of at most this many rows: a part of 50 ACOUSLIC cases (42,000 frames, ~1 MB without
# masks) stays one row group, and a reader filtering on case_id skips whole groups of larger parts.
ROW_GROUP_ROWS = 65_536


def table_url(output_url: str, table: str) -> str:
    return storage.join(output_url, table)


def part_name(part: str) -> str:
    return f"{part}.parquet"
