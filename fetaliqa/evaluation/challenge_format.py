"""ACOUSLIC-AI challenge-format predictions: a fetaliqa run written in that format, and any algorithm's read.

```
<dir>/<case_id>/fetal-abdomen-segmentation.mha    (T, H, W) uint8 stack of 0/1; only the selected frame
                                                   counts (the challenge ignores the others)
<dir>/<case_id>/fetal-abdomen-frame-number.json   one JSON integer: the selected frame, 0-based; -1 = none
```
This is what an algorithm submitted to the challenge outputs for one case. `export_run` writes a
`fetaliqa score` run in it (`fetaliqa export`); `read_prediction` reads it back for `fetaliqa evaluate
--predictions`, so that the challenge's metrics of a run and of its export are the same numbers.

A fetaliqa run's prediction of a case (`run_prediction`): fetaliqa's selection rule, the case's
highest-scoring frame (the first on a tie) when that frame is positive, else none (-1); its mask is that
frame's `mask_png` decoded (> 0) for SEG, and an empty mask for CLS (no mask) or when nothing is selected.
The exported stack has the scored image's T x H x W and spacing (read from the header of the case's
`source`, which must still be readable: a stacked image, or a DICOM study's first sweep, whose ultrasound region
gives H x W), all zero but for the selected frame (spacing 1 mm where a study states none).
"""

from __future__ import annotations

import json
import os
import tempfile

import cv2
import numpy as np
import pyarrow as pa
import SimpleITK as sitk

from fetaliqa.errors import InputError
from fetaliqa.inputs import storage
from fetaliqa.inputs import layout
from fetaliqa.inputs.cases import file_geometry
from fetaliqa.inputs.stacks import read_header
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.score.ledger import read_table
from fetaliqa.score.schema import CASES, FRAMES

SEGMENTATION = "fetal-abdomen-segmentation.mha"
FRAME_NUMBER = "fetal-abdomen-frame-number.json"
NO_FRAME = -1


class PredictionError(InputError):
    """A missing or malformed prediction file; the message names the file."""

    kind = "prediction"


# ---------------------------------------------------------------------------------------------- a run's predictions


def group_frames(frames: pa.Table) -> dict[str, dict]:
    """frames/ rows by case, sorted by frame: {case_id: {"frame", "score", "positive" arrays, "png" column}}."""
    if frames.num_rows == 0:
        return {}
    table = frames.select(["case_id", "frame", "score", "positive", "mask_png"]).sort_by(
        [("case_id", "ascending"), ("frame", "ascending")])
    ids = table["case_id"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    frame, score = table["frame"].to_numpy(), table["score"].to_numpy()
    positive = table["positive"].to_numpy(zero_copy_only=False)
    png = table["mask_png"].combine_chunks()
    return {ids[a]: {"frame": frame[a:b], "score": score[a:b], "positive": positive[a:b].astype(bool),
                     "png": png.slice(a, b - a)} for a, b in zip(starts, ends)}


def is_seg_run(frames: pa.Table) -> bool:
    """A SEG run sets `mask_area`; a CLS run leaves it null everywhere."""
    return frames.num_rows > 0 and frames["mask_area"].null_count < frames.num_rows


def select_positive_frame(scores: np.ndarray, positive: np.ndarray) -> int | None:
    """fetaliqa's selection from a case's (T,) scores and (T,) bool predictions: the highest-scoring frame
    (the first on a tie) when it is positive, else None (the method abstains)."""
    top = int(np.argmax(scores))
    return top if positive[top] else None


def selected_mask(rows: dict, frame: int | None, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of the selected `frame` of a case's `group_frames` rows: its `mask_png` > 0, or an
    empty mask when nothing is selected or the frame has no PNG (CLS). ValueError for a PNG that does not
    decode or is not `shape`."""
    png = None if frame is None else rows["png"][frame].as_py()
    if png is None:
        return np.zeros(shape, bool)
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if decoded is None or decoded.shape != tuple(shape):
        found = "not a PNG" if decoded is None else f"{decoded.shape}"
        raise ValueError(f"mask_png of frame {frame} is {found}; expected {tuple(shape)}")
    return decoded > 0


def run_prediction(rows: dict, shape: tuple[int, int]) -> tuple[int, np.ndarray]:
    """A fetaliqa run's challenge prediction of one case: (frame, (H, W) bool mask), frame -1 for none."""
    frame = select_positive_frame(rows["score"], rows["positive"])
    return (NO_FRAME if frame is None else frame), selected_mask(rows, frame, shape)


# ---------------------------------------------------------------------------------------------- writing


def case_url(root_url: str, case_id: str) -> str:
    """The folder of a case's prediction files: `root_url`/`case_id`. A case id is a path component here, so one
    that is not a single safe component (empty, '.', '..', holding '/', '\\' or a control character) is refused
    with `InputError` naming it: no path is ever built outside `root_url`. Scoring's case ids (file names,
    checked DICOM UIDs) always pass; this is a second line of defence."""
    if case_id in ("", ".", "..") or any(c in "/\\" or not c.isprintable() for c in case_id):
        shown = repr(case_id) if len(case_id) <= 80 else repr(case_id[:77]) + "..."
        raise InputError(root_url, f"case id {shown} is not a single safe path component: no prediction is "
                                   "written or read for it outside this folder")
    return storage.join(root_url, case_id)


def write_prediction(root_url: str, case_id: str, frame: int, mask: np.ndarray, shape: tuple[int, int, int],
                     spacing_mm: tuple[float, float] = (1.0, 1.0), storage_options: StorageOptions = None) -> None:
    """Write one case: a (T, H, W) = `shape` uint8 stack, zero but for `mask` ((H, W) bool) at `frame`
    (all zero for -1), zlib-compressed, with (row, col) `spacing_mm`; and the frame number."""
    stack = np.zeros(shape, np.uint8)
    if frame != NO_FRAME:
        stack[frame] = mask
    image = sitk.GetImageFromArray(stack)
    image.SetSpacing((float(spacing_mm[1]), float(spacing_mm[0]), 1.0))
    with tempfile.TemporaryDirectory(prefix="fetaliqa-") as tmp:
        local = os.path.join(tmp, SEGMENTATION)
        sitk.WriteImage(image, local, True)
        with open(local, "rb") as f:
            data = f.read()
    fs, path = storage.filesystem(case_url(root_url, case_id), storage_options)
    local_fs = storage.is_local(root_url)
    storage.put_object(fs, f"{path}/{SEGMENTATION}", data, local_fs)
    storage.put_object(fs, f"{path}/{FRAME_NUMBER}", json.dumps(int(frame)).encode(), local_fs)


def export_run(scores_url: str, output_url: str, storage_options: StorageOptions = None) -> dict:
    """Write every case in cases/ of a `fetaliqa score` run as challenge-format predictions under
    `output_url` (cases in errors/ have no prediction and are not written). Returns {"task": "seg"|"cls",
    "cases": written, "selected": cases with a selected frame}. Raises InputError (one line) when the run
    has no case, a case's frames/ rows are not frames 0..T-1, its mask PNG is bad, or its source image's
    header is unreadable or disagrees with the run's frame count."""
    so = storage_options
    frames, cases = read_table(scores_url, FRAMES, so), read_table(scores_url, CASES, so)
    if cases.num_rows == 0:
        raise InputError(scores_url, "no scored case to export (cases/ is empty)")
    grouped, selected = group_frames(frames), 0
    for case in sorted(cases.to_pylist(), key=lambda c: c["case_id"]):
        case_id, n = case["case_id"], case["frames"]
        rows = grouped.get(case_id)
        if rows is None or not np.array_equal(rows["frame"], np.arange(n)):
            raise InputError(scores_url, f"case {case_id}: frames/ does not hold frames 0..{n - 1}")
        shape, spacing = _scored_geometry(case, so)
        try:
            frame, mask = run_prediction(rows, shape[1:])
        except ValueError as err:
            raise InputError(scores_url, f"case {case_id}: {err}") from err
        write_prediction(output_url, case_id, frame, mask, shape, spacing or (1.0, 1.0), so)
        selected += frame != NO_FRAME
    return {"task": "seg" if is_seg_run(frames) else "cls", "cases": cases.num_rows, "selected": int(selected)}


def _scored_geometry(case: dict, storage_options: StorageOptions):
    """(T, H, W) and spacing (or None) of a scored case (a cases/ row) from its source's header
    (`fetaliqa.inputs.cases.file_geometry`). cases/ names a DICOM study by its first sweep, whose cropped size and
    spacing the study's sweeps share (its reader checks it); T is then the frames the run scored. A stacked
    image's own T must be the run's: else `InputError` naming it."""
    source, n = case["source"], case["frames"]
    shape, spacing = file_geometry(source, storage_options)
    if not layout.image_suffix(source):  # a DICOM study's first sweep
        return (n, *shape[1:]), spacing
    if shape[0] != n:
        raise InputError(source, f"{shape[0]} frames; the run scored {n}")
    return shape, spacing


# ---------------------------------------------------------------------------------------------- reading


def list_predictions(root_url: str, storage_options: StorageOptions = None) -> set[str]:
    """Case ids of a predictions folder: the names of its sub-folders (hidden ones skipped).
    `MissingObjectError` when the folder does not exist."""
    fs, path = storage.filesystem(root_url, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except Exception as err:  # noqa: BLE001 - every backend raises its own types
        raise storage.describe_io_error(root_url, err) from err
    names = {entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory"}
    return {name for name in names if not name.startswith((".", "_"))}


def read_frame_number(url: str, storage_options: StorageOptions = None) -> int:
    """The integer in a fetal-abdomen-frame-number.json; `PredictionError` (or the storage errors) naming
    `url` for anything else."""
    with storage.local_copy(url, storage_options) as local:
        with open(local, "rb") as f:
            text = f.read(1000)
    try:
        value = json.loads(text)
    except ValueError as err:
        raise PredictionError(url, f"not JSON ({err})") from err
    if type(value) is not int:  # bool is an int subclass: `true` is refused too
        raise PredictionError(url, f"holds {json.dumps(value)[:40]}, not an integer frame number")
    return value


def read_prediction(root_url: str, case_id: str, shape: tuple[int, int, int],
                    storage_options: StorageOptions = None) -> tuple[int, np.ndarray]:
    """One case's prediction: (frame, (H, W) bool mask of that frame; empty for -1).

    shape : the case's (T, H, W); the stack must be exactly that, and the frame in -1..T-1. Only the
    selected frame's pixels are decoded (and must be 0 or 1). `PredictionError` (one line, naming the
    file) for a file that is missing, empty or malformed.
    """
    base = case_url(root_url, case_id)
    frame_url, mask_url = storage.join(base, FRAME_NUMBER), storage.join(base, SEGMENTATION)
    try:
        frame = read_frame_number(frame_url, storage_options)
        if not NO_FRAME <= frame < shape[0]:
            raise PredictionError(frame_url, f"frame {frame} outside -1..{shape[0] - 1}")
        with storage.local_copy(mask_url, storage_options) as local:
            mask = _read_frame(local, mask_url, frame, shape)
    except PredictionError:
        raise
    except InputError as err:  # missing or empty file: the same one-line message, as a prediction error
        raise PredictionError(err.source, err.problem) from err
    return frame, mask


def _read_frame(local: str, url: str, frame: int, shape: tuple[int, int, int]) -> np.ndarray:
    reader = read_header(local, url)  # an unreadable header: the stacks' own error, as a PredictionError
    size = tuple(reader.GetSize()[::-1])
    if size != tuple(shape) or reader.GetNumberOfComponents() != 1:
        raise PredictionError(url, f"stack of shape {size} ({reader.GetNumberOfComponents()} components); "
                                   f"the case's frames are {tuple(shape)}, one component")
    if frame == NO_FRAME:
        return np.zeros(shape[1:], bool)
    reader.SetExtractIndex((0, 0, frame))
    reader.SetExtractSize((shape[2], shape[1], 1))
    try:
        pixels = sitk.GetArrayFromImage(reader.Execute()).reshape(shape[1:])
    except RuntimeError as err:
        raise PredictionError(url, "pixel data unreadable (truncated or corrupt)") from err
    if not np.isin(pixels, (0, 1)).all():
        raise PredictionError(url, f"frame {frame} holds values other than 0 and 1 "
                                   f"(max {pixels.max()}); the challenge requires a binary mask")
    return pixels != 0
