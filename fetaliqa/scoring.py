"""Components of the scoring pipeline: read a case, score its frames, write its rows.

The pipeline (see `jobs/score.py`) moves ONE ROW PER CASE:

    {"case_id", "source"} --read_case_row--> + images (T,224,224) uint8, native size, spacing
                          --Predictor------> + scores (T,) float32 [, masks (T,224,224) bool]
                                             (`fetaliqa.inference`: the only step that needs torch)
                          --CaseWriter-----> Parquet files of the case; a one-line tally row

A case is the unit of work because compressed .mha stacks decode only whole, and because a case whose
files are written together can be skipped exactly on a rerun. 840 frames a case keep a GPU's batches
full: the predictor runs them in micro-batches of `batch_size` frames.

Every component is a plain callable that works on a dict without Ray. This module imports no torch,
open_clip or peft: the read and write tasks' workers start in well under a second (with them, ~6 s
each on one core, which on a small machine cost as much CPU as decoding a dozen cases).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from fetaliqa import outputs
from fetaliqa.archive import read_image_stack
from fetaliqa.ellipse import circumference_mm
from fetaliqa.errors import InputError
from fetaliqa.layout import SWEEPS_PER_CASE
from fetaliqa.preprocess import IMAGE_SIZE, mask_to_native, resize_frames
from fetaliqa.storage import StorageOptions

# What decoding one ACOUSLIC-size case holds at its peak: the compressed file (~200 MB), the decoded
# stack (351 MB) and the resized frames (42 MB); Ray Data measured 1.1 GiB. Declaring it lets Ray bound
# concurrent reads by RAM, and keeps the read step a task of its own instead of being fused into the
# predictor actors, which would serialise every decode behind the model.
READ_TASK_MEMORY = 3 << 29  # 1.5 GiB

# Writing a case is light (Parquet of a few kB; for SEG, PNGs of the positive frames' masks), and Ray Data
# reserves a share of the cluster's CPUs for every operator by what its tasks declare: at the default of
# one CPU each, the writers' reservation kept a second read task from starting on a 4-CPU node. Capped
# at two writers per predictor actor, they keep up with a GPU's 1-2 cases/s.
WRITE_TASK_CPUS = 0.25
WRITERS_PER_ACTOR = 2


def read_case_row(row: dict, storage_options: StorageOptions = None, image_size: int = IMAGE_SIZE) -> dict:
    """Decode one case and preprocess its frames on CPU; record an input error instead of raising.

    row: {"case_id": str, "source": str (image URI)}. Returns the row plus `images` (T, S, S)
    uint8 (S = `image_size`, the checkpoint's), `height`, `width`, `spacing_row`, `spacing_col` (mm), and `error`, `message` ("" when read).
    A case that cannot be read comes back with T = 0 and the error kind and one-line message.
    """
    out = {"case_id": row["case_id"], "source": row["source"],
           "images": np.zeros((0, image_size, image_size), np.uint8), "height": 0,
           "width": 0, "spacing_row": 0.0, "spacing_col": 0.0, "error": "", "message": ""}
    try:
        stack = read_image_stack(row["source"], storage_options)
    except InputError as err:
        return out | {"error": err.kind, "message": str(err)}
    except Exception as err:  # noqa: BLE001 - one unreadable case must not stop an archive
        message = " ".join(f"{row['source']}: unreadable ({type(err).__name__}: {err})".split())
        return out | {"error": "unreadable", "message": message}
    _, height, width = stack.frames.shape
    return out | {"images": resize_frames(stack.frames, image_size), "height": height, "width": width,
                  "spacing_row": stack.spacing_mm[0], "spacing_col": stack.spacing_mm[1]}


@dataclass
class CaseWriter:
    """Postprocesses one scored case and writes its `frames/` and `cases/` (or `errors/`) files.

    Returns a tally row: {"case_id", "frames", "positives", "error"}.
    """

    output: str
    threshold: float
    model_id: str
    storage_options: StorageOptions = None

    def __call__(self, row: dict) -> dict:
        case_id = row["case_id"]
        if row["error"]:
            errors = pa.table({"source": [row["source"]], "error": [row["error"]], "message": [row["message"]]},
                              schema=outputs.ERRORS_SCHEMA)
            outputs.write_table(errors, self._file(outputs.ERRORS, case_id), self.storage_options)
            return {"case_id": case_id, "frames": 0, "positives": 0, "error": row["error"]}
        scores = np.asarray(row["scores"], np.float32)
        masks = None if row.get("masks") is None else np.asarray(row["masks"], bool)
        frames = self._frames_table(row, scores, masks)
        outputs.write_table(frames, self._file(outputs.FRAMES, case_id), self.storage_options)
        outputs.remove_file(self._file(outputs.ERRORS, case_id), self.storage_options)
        case = self._case_table(row, scores, masks)
        outputs.write_table(case, self._file(outputs.CASES, case_id), self.storage_options)  # the marker: last
        positives = int(case["positives"][0].as_py())
        return {"case_id": case_id, "frames": len(scores), "positives": positives, "error": ""}

    def _file(self, table: str, case_id: str) -> str:
        return outputs.case_file(self.output, table, case_id)

    def _frames_table(self, row: dict, scores: np.ndarray, masks: np.ndarray | None) -> pa.Table:
        n = len(scores)
        positive = scores >= self.threshold
        area, png = [None] * n, [None] * n
        if masks is not None:
            area = [0] * n
            for i in np.flatnonzero(masks.reshape(n, -1).any(axis=1)):
                native = mask_to_native(masks[i:i + 1], row["height"], row["width"])[0]
                area[i] = int(native.sum())
                if positive[i]:
                    png[i] = _png(native)
        frame = np.arange(n, dtype=np.int32)
        return pa.table({
            "case_id": [row["case_id"]] * n, "sweep": (frame // (n // SWEEPS_PER_CASE) + 1).astype(np.int8),
            "frame": frame, "score": scores, "positive": positive, "mask_area": pa.array(area, pa.int32()),
            "mask_png": pa.array(png, pa.binary()), "model": [self.model_id] * n,
        }, schema=outputs.FRAMES_SCHEMA)

    def _case_table(self, row: dict, scores: np.ndarray, masks: np.ndarray | None) -> pa.Table:
        n = len(scores)
        best = int(np.argmax(scores))
        ac_mm = None
        if masks is not None and masks[best].any():
            native = mask_to_native(masks[best:best + 1], row["height"], row["width"])[0]
            ac_mm = circumference_mm(native, (row["spacing_row"], row["spacing_col"]))
        return pa.table({
            "case_id": [row["case_id"]], "frames": [n], "positives": [int((scores >= self.threshold).sum())],
            "best_frame": [best], "best_sweep": [best // (n // SWEEPS_PER_CASE) + 1],
            "best_score": [float(scores[best])], "ac_mm": pa.array([ac_mm], pa.float32()), "source": [row["source"]],
        }, schema=outputs.CASES_SCHEMA)


def _png(mask: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()
