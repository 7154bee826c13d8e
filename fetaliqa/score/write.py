"""Scoring's output side: summarise each scored case on CPU, then write parts of many cases.

`summarise_cases` (a CPU map right after the predictor) turns a case's scores and, for SEG, its bit-packed
(T, S, S) masks into one row: per-frame lists (`score`, `positive`, `mask_area` at native size, `mask_png`
of positive frames) and the case summary (best frame and its review JPEG, decision, AC of its mask, the
study's context). Masks go no farther than this step. It is also where every identifier becomes what the
output says of it: redacted (`fetaliqa.redact`) and, with a key, pseudonymised (`fetaliqa.pseudonym`).
`PartWriter` (a Ray Data `Datasink`) receives those rows, `cases_per_file` or more at a time, and writes
them as one part: a file per table, rows sorted by case_id then frame, then the part's commit record
(`fetaliqa.score.ledger`). Ray Data fuses the two into one task per part, so the (T, S, S) masks travel
once, from the predictor to that task, bit-packed (5.3 MB an ACOUSLIC case instead of 42 MB), and never
reach the output. This module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from fetaliqa.ellipse import mask_circumference_mm
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.preprocess import mask_to_native
from fetaliqa.pseudonym import KeyFile, Pseudonyms, pseudonyms_of
from fetaliqa.redact import redact_text
from fetaliqa.score import ledger
from fetaliqa.score.read import STUDY_CONTEXT
from fetaliqa.score.schema import CASES_SCHEMA, ERRORS, ERRORS_SCHEMA, FRAMES, FRAMES_SCHEMA, CASES

# One summarised case: the per-frame lists the writer flattens into `frames/` and the `cases/` fields.
CASE_ROW_SCHEMA = pa.schema([
    ("case_id", pa.string()), ("source", pa.string()), ("error", pa.string()), ("message", pa.string()),
    ("instance_errors", pa.string()), ("note", pa.string()),
    ("score", pa.list_(pa.float32())), ("positive", pa.list_(pa.bool_())),
    ("mask_area", pa.list_(pa.int32())), ("mask_png", pa.list_(pa.binary())),
    ("sweep", pa.list_(pa.int8())), ("sop_instance_uid", pa.list_(pa.string())), ("instance_frame", pa.list_(pa.int32())),
    ("frames", pa.int32()), ("sweeps", pa.int8()), ("positives", pa.int32()), ("best_frame", pa.int32()),
    ("best_sweep", pa.int8()), ("best_score", pa.float32()), ("ac_mm", pa.float32()),
    ("decision", pa.string()), ("usable_sweeps", pa.list_(pa.int8())), ("best_frame_image", pa.binary()),
    *((name, pa.string()) for name in STUDY_CONTEXT),
])
USABLE, RESCAN = "usable", "rescan"

# `best_frame_image` is a JPEG of at most BEST_FRAME_MAX_BYTES. Synthetic ACOUSLIC-size speckle frames (562 x 744,
# resized to 224 x 224) measured at most 10.7 kB gray and 11.3 kB with a SEG outline at quality 90 (mean absolute
# error 1.3 gray levels; 8.6 / 9.1 kB at 85, 14.7 / 15.2 kB at 95): 90 leaves a third for frames busier than
# those. A frame still over the bound (pure noise: 28 kB at 75) is encoded again at lower qualities until it
# fits (a 224 x 224 frame of noise fits at 15), so the bound holds for any 224 x 224 frame.
BEST_FRAME_QUALITY = 90
BEST_FRAME_MAX_BYTES = 16_000
OUTLINE_BGR = (0, 255, 255)  # yellow, 1 px

# Writing a part is light (Parquet of a few MB at most), and Ray Data reserves a share of the cluster's
# CPUs for every operator by what its tasks declare: at one CPU each, the writers' reservation kept a
# second read task from starting on a 4-CPU node.
WRITE_TASK_CPUS = 0.25


def summarise_cases(batch: dict[str, np.ndarray], threshold: float, image_size: int,
                    key_file: KeyFile | None = None) -> pa.Table:
    """Scored cases -> one `CASE_ROW_SCHEMA` row each, on CPU.

    batch: `ScoreFrames`' output (`scores` (T,) float32, `best_image` (S, S) uint8; SEG: `masks` (T, S*S/8),
    each frame's (S, S) mask bit-packed, S = `image_size`). A SEG frame's `mask_area` counts its mask's pixels
    at native size (0 when empty); its `mask_png` is set where the frame is positive; `ac_mm` is the ellipse
    fit to the best frame's native mask. `best_frame_image` is `best_image` as a JPEG (`_review_jpeg`).
    Its text columns (`case_id`, `source`, `message`, `note`, `instance_errors`) are
    `fetaliqa.redact.redact_text`ed: no presigned URL's query string goes farther. With `key_file`, every
    identifier (`case_id`, `source`, `sop_instance_uid`, `institution`, `station`, and those in the text
    columns) is pseudonymised and `study_date` cut to its month (`fetaliqa.pseudonym`).
    """
    pseudonyms = pseudonyms_of(key_file)
    rows = [_summarise_case(batch, i, threshold, image_size, pseudonyms) for i in range(len(batch["case_id"]))]
    return pa.Table.from_pylist(rows, schema=CASE_ROW_SCHEMA)


def _summarise_case(batch: dict[str, np.ndarray], i: int, threshold: float, side: int, pseudonyms: Pseudonyms) -> dict:
    # Every text a row writes is redacted here, the one way to the output: reading used the URLs whole, the
    # tables and commit records get them without query strings. Redacting `case_id` changes no scored case's id
    # (a file name's stem or a StudyInstanceUID), only a failed one's that holds a presigned URL. Pseudonyms are
    # of the redacted texts, so that the key holder recomputes them from what an unpseudonymised run writes.
    text = {key: redact_text(str(batch[key][i])) for key in ("case_id", "source", "error", "message", "note")}
    failures = [[redact_text(t) for t in failure] for failure in json.loads(str(batch["instance_errors"][i]) or "[]")]
    scores = np.asarray(batch["scores"][i], np.float32)
    n = len(scores)
    sweeps = json.loads(str(batch["sweeps"][i])) if n else []
    uids = [s["sop_instance_uid"] for s in sweeps]
    identifiers = _with_schemeless([text["case_id"], text["source"], *uids, *(f[0] for f in failures)])
    row = {"case_id": pseudonyms.id(text["case_id"]), "source": pseudonyms.id(text["source"]), "error": text["error"],
           "message": pseudonyms.text(text["message"], identifiers),
           "note": pseudonyms.text(text["note"], identifiers) or None,
           "instance_errors": json.dumps([[pseudonyms.id(source), kind, pseudonyms.text(message, identifiers)]
                                          for source, kind, message in failures])}
    if row["error"] or n == 0:
        return row | {"score": [], "positive": [], "mask_area": [], "mask_png": [], "sweep": [], "sop_instance_uid": [],
                      "instance_frame": [], "frames": 0}
    counts = [s["frames"] for s in sweeps]
    sweep_index = np.repeat(np.arange(len(sweeps)), counts)  # 0-based sweep of each frame
    dicom = uids[0] is not None
    positive = scores >= threshold
    best = int(np.argmax(scores))
    area, png, ac_mm, outline = [None] * n, [None] * n, None, None
    if "masks" in batch:
        masks = np.unpackbits(np.asarray(batch["masks"][i]), axis=1, count=side * side).reshape(n, side, side)
        area, outline = [0] * n, masks[best]
        for f in np.flatnonzero(masks.any(axis=(1, 2))):
            sweep = sweeps[sweep_index[f]]
            native = mask_to_native(masks[f:f + 1], sweep["height"], sweep["width"])[0]
            area[f] = int(native.sum())
            if positive[f]:
                png[f] = _png(native)
            if f == best and sweep["spacing"] is not None:  # no spacing: ac_mm stays null, `note` says why
                ac_mm = mask_circumference_mm(native, tuple(sweep["spacing"]))
    written_uids = [pseudonyms.id(uid) for uid in uids]
    usable_sweeps = sorted({int(sweep_index[f]) + 1 for f in np.flatnonzero(positive)})
    return row | {"score": scores, "positive": positive, "mask_area": area, "mask_png": png,
                  "sweep": (sweep_index + 1).astype(np.int8),
                  "sop_instance_uid": [written_uids[j] for j in sweep_index] if dicom else [None] * n,
                  "instance_frame": np.concatenate([np.arange(k, dtype=np.int32) for k in counts]) if dicom else [None] * n,
                  "frames": n, "sweeps": len(sweeps), "positives": int(positive.sum()), "best_frame": best,
                  "best_sweep": int(sweep_index[best]) + 1, "best_score": float(scores[best]), "ac_mm": ac_mm,
                  "decision": USABLE if usable_sweeps else RESCAN, "usable_sweeps": usable_sweeps,
                  "best_frame_image": _review_jpeg(np.asarray(batch["best_image"][i], np.uint8), outline),
                  **_study_context(str(batch["study"][i]), pseudonyms)}


def _with_schemeless(identifiers: list[str | None]) -> list[str]:
    """`identifiers`, and each URL among them without its scheme too ("bucket/key" of "s3://bucket/key"), the way
    some storage errors name an object."""
    return [*filter(None, identifiers), *(i.split("://", 1)[1] for i in identifiers if i and "://" in i)]


def _study_context(study: str, pseudonyms: Pseudonyms) -> dict:
    """`cases/`' context columns of a case from its `study` JSON text (`read_case_row`; "{}" for stacked images:
    all null): institution and station pseudonymised, the date kept to its month (with a key)."""
    context = dict.fromkeys(STUDY_CONTEXT) | json.loads(study or "{}")
    return context | {"study_date": pseudonyms.date(context["study_date"]),
                      "institution": pseudonyms.id(context["institution"]),
                      "station": pseudonyms.id(context["station"])}


def _review_jpeg(image: np.ndarray, mask: np.ndarray | None) -> bytes:
    """The best frame as the model saw it, for review: (S, S) uint8 gray -> JPEG of at most `BEST_FRAME_MAX_BYTES`
    (see there). With a SEG `mask` ((S, S), 0/1), BGR with the mask's outline drawn in `OUTLINE_BGR`, 1 px
    (none when the mask is empty); without, 1-channel gray."""
    if mask is not None:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        image = cv2.drawContours(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), contours, -1, OUTLINE_BGR, 1)
    for quality in range(BEST_FRAME_QUALITY, 0, -15):
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        if len(encoded) <= BEST_FRAME_MAX_BYTES:
            break
    return encoded.tobytes()


class PartWriter(Datasink):
    """Writes summarised cases as parts of `cases_per_file` or more cases each; see `fetaliqa.score.ledger`.

    `write` returns the part's tally {"part", "cases", "failed", "frames", "positives"}; `progress`, when
    given, is an actor with a `record(tally)` method (`fetaliqa.score.record.Progress`).
    """

    def __init__(self, output: str, run_id: str, model_id: str, cases_per_file: int,
                 storage_options: StorageOptions = None, progress=None):
        self.output = output
        self.run_id = run_id
        self.model_id = model_id
        self.cases_per_file = cases_per_file
        self.storage_options = storage_options
        self.progress = progress
        self.tallies: list[dict] = []

    def get_name(self) -> str:
        return "WriteParts"

    @property
    def min_rows_per_write(self) -> int:
        return self.cases_per_file

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        rows = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks])
        rows = rows.take(pc.sort_indices(rows, [("case_id", "ascending")]))
        failed = rows.filter(pc.not_equal(rows["error"], ""))
        scored = rows.filter(pc.equal(rows["error"], ""))
        tables = {FRAMES: self._frames(scored), CASES: self._cases(scored), ERRORS: self._errors(failed, rows)}
        part = f"{self.run_id}-{ctx.task_idx:06d}"
        # A failed study's bad instances are retried with it: their rows go with its id, not with the rows kept
        # on a retry (bad instances of studies this part scored, which are not read again).
        retried = failed["case_id"].to_pylist() + [_error_case_id(source) for text in failed["instance_errors"].to_pylist()
                                                   for source, _, _ in json.loads(text or "[]")]
        ledger.write_part(self.output, part, tables, scored["case_id"].to_pylist(), retried, self.storage_options)
        tally = {"part": part, "cases": scored.num_rows, "failed": failed.num_rows,
                 "frames": tables[FRAMES].num_rows, "positives": int(pc.sum(scored["positives"]).as_py() or 0)}
        if self.progress is not None:
            self.progress.record.remote(tally)
        return tally

    def on_write_complete(self, write_result) -> None:
        self.tallies = [t for t in write_result.write_returns if t]

    def _frames(self, scored: pa.Table) -> pa.Table:
        scores = scored["score"].combine_chunks() if scored.num_rows else pa.array([], pa.list_(pa.float32()))
        lengths = pc.list_value_length(scores).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
        frame = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
        total = len(frame)

        def flat(name: str) -> pa.Array:
            return pc.list_flatten(scored[name].combine_chunks()) if total else pa.array([], CASE_ROW_SCHEMA.field(name).type.value_type)

        return pa.table({
            "case_id": pc.take(scored["case_id"], pc.list_parent_indices(scores)) if total else pa.array([], pa.string()),
            "sweep": flat("sweep"), "frame": frame.astype(np.int32), "sop_instance_uid": flat("sop_instance_uid"),
            "instance_frame": flat("instance_frame"), "score": flat("score"), "positive": flat("positive"),
            "mask_area": flat("mask_area"), "mask_png": flat("mask_png"),
            "model": pa.repeat(self.model_id, total), "run_id": pa.repeat(self.run_id, total),
        }, schema=FRAMES_SCHEMA)

    def _cases(self, scored: pa.Table) -> pa.Table:
        return pa.table({name: pa.repeat(self.run_id, scored.num_rows) if name == "run_id" else scored[name]
                         for name in CASES_SCHEMA.names}, schema=CASES_SCHEMA)

    def _errors(self, failed: pa.Table, rows: pa.Table) -> pa.Table:
        """The failed cases' rows and one row per failed instance of any study in `rows` (keyed by its URI),
        sorted by case id."""
        columns = {name: failed[name].to_pylist() for name in ERRORS_SCHEMA.names if name != "run_id"}
        for text in rows["instance_errors"].to_pylist():
            for source, kind, message in json.loads(text or "[]"):
                for name, value in zip(("case_id", "source", "error", "message"),
                                       (_error_case_id(source), source, kind, message)):
                    columns[name].append(value)
        n = len(columns["case_id"])
        return pa.table({**columns, "run_id": pa.repeat(self.run_id, n)}, schema=ERRORS_SCHEMA).sort_by("case_id")


def as_written(cases: pa.Table, pseudonyms: Pseudonyms, columns: tuple[str, ...] = ("case_id", "source")) -> pa.Table:
    """`cases` (`case_id`, `source`, ... of a listing) with `columns` as `summarise_cases` writes them: redacted,
    then pseudonymised with a key. What the driver compares with commit records (`ledger.resume`) and writes for
    lost cases (`ledger.record_lost_cases`)."""
    for name in columns:
        written = [pseudonyms.id(redact_text(text)) for text in cases[name].to_pylist()]
        cases = cases.set_column(cases.schema.get_field_index(name), name, pa.array(written, pa.string()))
    return cases


def _error_case_id(source: str) -> str:
    """The `errors/` case id of a bad instance of a DICOM study: its URI. Not its file name: names repeat in every
    folder of a PACS export (IM000001, ...), and a retry drops the rows of the ids it retries (`ledger.resume`)."""
    return source


def _png(mask: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()
