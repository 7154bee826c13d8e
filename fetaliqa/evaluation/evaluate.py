"""Evaluate against an archive's annotations: a scoring run (`evaluate`) or challenge-format predictions
(`evaluate_predictions`); `fetaliqa.evaluation.report` writes the results as `metrics.json` and `report.html`.

```
<scores>/frames/, cases/, errors/       (a `fetaliqa score` run)  -+
  or <predictions>/<case_id>/...        (`fetaliqa.evaluation.challenge_format` format) |
<data>/masks/stacked_fetal_abdomen/     (ground truth)             +-> evaluate() -> Evaluation
<data>/circumferences/...csv            (reference AC per sweep)  -+        |
                                                                      report.write_report(output)
<output>/metrics.json, report.html, pr_curve.png, traces_<case>.png  <------+
```
Ground truth: a frame is positive when its mask is non-empty (label 1 optimal or 2 suboptimal).

The operating point is the run's own: a frame is predicted positive where `positive` is true (score >= the
checkpoint's threshold, which the output does not store and need not: `positive` carries it). Threshold-free
measures (AUROC, AUPRC, the PR curve) use `score`, and the threshold that would maximise F1 on these very
frames is reported for information only (it is chosen on the test set, so it is not a result).

Case metrics (`fetaliqa.evaluation.metrics.case_metrics`): the method selects a case's highest-scoring frame when that
frame is positive, else abstains. SEG runs (whose `mask_area` is set) are scored on the selected frame's
mask (`mask_png`, or an empty mask where the frame is not positive) and on AC (`cases/ac_mm`) against the
csv's AC of the selected frame's sweep; an abstaining case is scored against its first sweep with an AC
(relative AC error 1 if it has one). CLS runs have neither mask nor AC: nearest_dice and relative_ac_error
are null. metrics.json's "case_metrics" holds these under fetaliqa's own names (selection_score,
nearest_dice, relative_ac_error); the challenge's wfss, soft_dice and nae_ac are only in "acouslic".

Paper-comparable frame metrics (`frame_metrics_paper`, a second table beside the all-frames one): the
frames, labels and decision rule of the FetalCLIP-IQA paper's code, so its F1 0.757 (CLS) / 0.771 (SEG) can
be set beside a run's:
- frames of AC sweeps only: sweeps with a reference AC in the circumference csv (the paper's preprocessing
  skips the others); without the csv the table is null and a note says why;
- a frame is truly positive when its mask, zero-padded to a square and resized to 224 x 224 by nearest
  neighbour (`preprocess.mask_to_model`), is non-empty (a few-pixel mask can vanish there);
- predicted positive when score > 0.5 (CLS) or the mask covers more than 1% of the 224 x 224 image
  (SEG: score > 0.01), strictly and whatever the checkpoint's own threshold;
- SEG's "Dice" is the paper's: one pixel F-score pooled over all those frames at 224 x 224,
  2 TP / (2 TP + FP + FN). A run keeps masks of its positive frames only (`mask_png`), so its other frames
  count as empty predictions, where the paper's code also counted their sub-threshold pixels; the
  native-size PNGs are mapped back to 224 x 224 like the truth.
  {"frames", "cases", "rule", "n", "positives", "tp", "fp", "tn", "fn", "accuracy", "precision", "recall",
   "f1", "specificity", "pixel_f_score" (SEG; null for CLS)}

The challenge's own metrics (`fetaliqa.evaluation.acouslic`, rule for rule: leaderboard numbers) are metrics.json's
"acouslic" section, for a run and for predictions alike:
  {"per_case": [{"case_id", "frame", "wfss", "soft_dice", "nae_ac", "ac_mm", "reference_ac_mm"}, ...],
   "aggregate": {"wfss", "soft_dice", "nae_ac", "score"}, "fov": "file <url>" | "derived from each case's frames"}
A run's prediction of a case is `fetaliqa.evaluation.challenge_format.run_prediction` (the frame above, -1 when abstaining; the
frame's mask for SEG, an empty mask for CLS). The FOV mask is the `--fov-mask` file for every case, or
derived per case from its image stack (`acouslic.fov_from_images`; reads each image, ~1 s a full-size
case). JSON holds no inf or NaN, so such values are written as null: the challenge's Dice of an empty truth
against an empty prediction is SimpleITK's inf (an abstaining case whose last frame is unannotated; an empty
mask on an unannotated frame, e.g. every CLS selection of one), so that case's soft_dice is null, and since
the challenge's plain means propagate it, the aggregate soft_dice and score are null too. A null there
reads "inf in the challenge's own evaluation"; ac_mm and reference_ac_mm are null when missing.

Every case is accounted for: a case in the archive or the run (or the predictions) that cannot be evaluated
is listed under `excluded_cases` with its reason, never dropped silently, and no metric includes it:
`scoring_error` (in errors/), `not_scored` (in neither cases/ nor errors/), `not_in_archive`, `no_mask`,
`mask_error` (unreadable mask), `frames_mismatch` (frames/ rows or mask frames disagree with cases/),
`mask_png` (undecodable or wrong size), `image_error` (the image a FOV is derived from is unreadable);
predictions only: `not_predicted` (no `<case_id>/` folder), `prediction_error` (a missing or malformed
file, named in the message). The challenge itself would refuse a submission missing a case; here the
aggregate covers the evaluated cases and says how many were excluded.

Masks are read once per case, one case at a time (a full-size mask stack is 351 MB), and only the mask is
decoded, not the image (unless the FOV is derived): ~0.4 s per full-size case here, against ~10 s for
`fetaliqa.inputs.cases.read_case(..., with_mask=True)` on a loaded 2-core machine (the image is what costs).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fetaliqa.errors import InputError
from fetaliqa.evaluation import acouslic
from fetaliqa.evaluation import challenge_format
from fetaliqa.evaluation import metrics
from fetaliqa.inputs import layout
from fetaliqa.inputs import storage
from fetaliqa.inputs.cases import read_case_frames
from fetaliqa.inputs.listing import CaseRef, archive_root, list_cases
from fetaliqa.inputs.stacks import read_circumferences, read_mask_stack
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.preprocess import IMAGE_SIZE, mask_to_model
from fetaliqa.score.ledger import read_table
from fetaliqa.score.schema import CASES, ERRORS, FRAMES

LABEL_NAMES = {layout.MASK_BACKGROUND: "none", layout.MASK_OPTIMAL: "optimal", layout.MASK_SUBOPTIMAL: "suboptimal"}
FOV_DERIVED = "derived from each case's frames"
ACOUSLIC_CASE_KEYS = ("case_id", "frame", "wfss", "soft_dice", "nae_ac", "ac_mm", "reference_ac_mm")
# The paper's decision rules (its code: sigmoid > 0.5; mask area > 1% of the 224 x 224 image), strict.
PAPER_RULE = {"cls": (0.5, "score > 0.5"), "seg": (0.01, "predicted mask > 1% of the 224 x 224 image")}


@dataclass
class CaseTrace:
    """What the plots need of one evaluated case; arrays are (T,), frame f in sweep f // (T // 6)."""

    case_id: str
    scores: np.ndarray  # float32 in [0, 1]
    positive: np.ndarray  # bool, the run's prediction
    labels: np.ndarray  # uint8 in {0, 1, 2}, from the masks
    selected: int | None  # the frame the method selects, None when it abstains
    reference_ac_mm: list = field(default_factory=list)  # 6 values (None where a sweep has no AC)


@dataclass
class PaperFrames:
    """One case's frames as the paper's code counts them (module docstring): those of its AC sweeps.
    labels, positive : (n,) bool; pixels : (overlap, predicted, truth) pixel counts at 224 x 224 for SEG,
    None for CLS."""

    labels: np.ndarray
    positive: np.ndarray
    pixels: tuple[int, int, int] | None


@dataclass
class Evaluation:
    """`metrics`: the JSON-ready content of metrics.json; `traces`: the evaluated cases, sorted by id
    (empty for predictions, which have no frame scores)."""

    metrics: dict
    traces: list[CaseTrace]


class _Excluded(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---------------------------------------------------------------------------------------------- the challenge's metrics


@dataclass(frozen=True, eq=False)
class Fov:
    """The FOV mask of the challenge's metrics: one (H, W) array for every case (`from_url`), or, with
    `array` None, each case's derived from its image stack."""

    array: np.ndarray | None = None
    url: str | None = None

    @classmethod
    def from_url(cls, url: str, storage_options: StorageOptions = None) -> Fov:
        """Read a 2-D FOV mask (any file SimpleITK reads; the challenge's is fov_mask.mha) from any fsspec URL."""
        with storage.local_copy(url, storage_options) as local:
            try:
                array = acouslic.read_fov_mask(local)
            except RuntimeError as err:
                raise InputError(url, "not an image SimpleITK reads (expected a 2-D FOV mask)") from err
            except ValueError as err:
                raise InputError(url, str(err).replace(local, "the file")) from err
        return cls(array, url)

    @property
    def source(self) -> str:
        """What metrics.json's "fov" and the report say."""
        return FOV_DERIVED if self.array is None else f"file {self.url}"

    def for_case(self, case: CaseRef, shape: tuple[int, int], storage_options: StorageOptions) -> np.ndarray:
        """(H, W) FOV of `case`, whose frames are (H, W) = `shape`. A file of another shape fails the whole
        evaluation (InputError); an unreadable image excludes the case."""
        if self.array is not None:
            if self.array.shape != tuple(shape):
                raise InputError(self.url, f"FOV mask is {self.array.shape}; case {case.case_id}'s frames are "
                                           f"{tuple(shape)}")
            return self.array
        try:
            frames = read_case_frames(case, storage_options).frames
        except InputError as err:
            raise _Excluded("image_error", f"FOV not derived: {err}") from err
        if frames.shape[1:] != tuple(shape):
            raise _Excluded("frames_mismatch", f"image frames {frames.shape[1:]}; mask frames {tuple(shape)}")
        return acouslic.fov_from_images(frames)


def acouslic_case(case_id: str, labels: np.ndarray, frame: int, mask: np.ndarray, reference_acs: list,
                  fov: np.ndarray) -> dict:
    """`acouslic.score_case` of one case with its id: labels (T, H, W) uint8 in {0, 1, 2}, frame -1..T-1,
    mask (H, W) bool, reference_acs 6 values (None where missing), fov (H, W). inf is kept here."""
    return {"case_id": case_id, **acouslic.score_case(labels, mask, frame, reference_acs, fov)}


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def acouslic_section(per_case: list[dict], fov: Fov) -> dict:
    """metrics.json's "acouslic": per-case values, `acouslic.aggregate` of them, the FOV's source; inf and
    NaN written as null (module docstring)."""
    aggregate = acouslic.aggregate(per_case)
    return {"per_case": [{key: _json_value(case[key]) for key in ACOUSLIC_CASE_KEYS} for case in per_case],
            "aggregate": {key: _json_value(value) for key, value in aggregate.items()}, "fov": fov.source}


def paper_frames(gt: np.ndarray, rows: dict, reference_acs: list, is_seg: bool) -> PaperFrames:
    """The frames of a case's AC sweeps as the paper counts them. gt (T, H, W) uint8 labels; rows: the
    case's `challenge_format.group_frames` entry; reference_acs: 6 values, None where a sweep has no AC."""
    per_sweep = len(gt) // layout.SWEEPS_PER_CASE
    frames = np.concatenate([np.arange(s * per_sweep, (s + 1) * per_sweep)
                             for s, ac in enumerate(reference_acs) if ac is not None] or [np.zeros(0, int)])
    truth = mask_to_model(gt[frames], IMAGE_SIZE).astype(bool)
    threshold, _ = PAPER_RULE["seg" if is_seg else "cls"]
    positive = rows["score"][frames] > threshold
    pixels = None
    if is_seg:
        predicted = np.zeros_like(truth)
        for i, frame in enumerate(frames):
            if rows["png"][frame].is_valid:  # frames without a PNG predict nothing (module docstring)
                try:
                    native = challenge_format.selected_mask(rows, int(frame), gt.shape[1:])
                except ValueError as err:
                    raise _Excluded("mask_png", str(err)) from err
                predicted[i] = mask_to_model(native[None].astype(np.uint8), IMAGE_SIZE)[0]
        pixels = (int((predicted & truth).sum()), int(predicted.sum()), int(truth.sum()))
    return PaperFrames(truth.any(axis=(1, 2)), positive, pixels)


def paper_frame_table(cases: list[PaperFrames], task: str) -> dict:
    """metrics.json's "frame_metrics_paper" from the evaluated cases' `paper_frames` (module docstring)."""
    labels = np.concatenate([c.labels for c in cases] or [np.zeros(0, bool)])
    positive = np.concatenate([c.positive for c in cases] or [np.zeros(0, bool)])
    pixel_f_score = None
    if task == "seg":
        overlap, predicted, truth = (sum(c.pixels[i] for c in cases) for i in range(3))
        pixel_f_score = metrics.pooled_f_score(overlap, predicted, truth)
    return {"frames": "frames of AC sweeps only (a reference AC in the csv), labels at 224 x 224",
            "cases": sum(bool(len(c.labels)) for c in cases), "rule": PAPER_RULE[task][1],
            **_counts_at_positive(labels, positive), "pixel_f_score": pixel_f_score}


def _circumferences(data_url: str, storage_options: StorageOptions) -> tuple[dict, str | None]:
    try:
        return read_circumferences(archive_root(data_url), storage_options), None
    except InputError as err:  # missing or malformed: frame metrics, WFSS and Dice do not need it
        return {}, f"circumference csv not used ({err}): NAE of AC not computed"


def _no_case_error(source: str, data_url: str, excluded: list[dict], what: str, where: str) -> InputError:
    reasons = ", ".join(f"{n} {r}" for r, n in _count_reasons(excluded).items()) or f"no cases in the {where}"
    return InputError(source, f"no {what} case could be evaluated against {data_url} ({reasons})")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- a scoring run


def evaluate(scores_url: str, data_url: str, storage_options: StorageOptions = None,
             fov: Fov | None = None) -> Evaluation:
    """Join a scoring run with the archive's masks and compute frame, sweep and case metrics, and the
    challenge's (under "acouslic", with `fov`: default derived per case).

    scores_url : the `--output` folder of `fetaliqa score`. data_url : what was scored, any input of
    `fetaliqa.inputs.listing` whose root holds the masks (and the circumference csv when present) in the
    ACOUSLIC layout: stacked images, or DICOM studies with masks keyed by StudyInstanceUID. Raises `InputError` when no case can be
    evaluated at all (the message counts the reasons).
    """
    so, fov = storage_options, fov or Fov()
    frames = read_table(scores_url, FRAMES, so)
    cases = read_table(scores_url, CASES, so)
    errors = read_table(scores_url, ERRORS, so)
    archive = {c.case_id: c for c in list_cases(data_url, so)}
    circumferences, ac_note = _circumferences(data_url, so)
    is_seg = challenge_format.is_seg_run(frames)

    rows = challenge_format.group_frames(frames)
    excluded = _unscored_cases(archive, cases, errors)
    traces, per_case, acouslic, paper = [], [], [], []
    for case in sorted(cases.to_pylist(), key=lambda c: c["case_id"]):
        case_id = case["case_id"]
        try:
            trace, result, challenge_result, paper_case = _evaluate_case(
                case, rows.get(case_id), archive.get(case_id), circumferences, is_seg, fov, so)
        except _Excluded as why:
            excluded.append({"case_id": case_id, "source": case["source"], "reason": why.reason,
                             "message": why.message})
            continue
        traces.append(trace)
        per_case.append(result)
        acouslic.append(challenge_result)
        paper.append(paper_case)
    if not traces:
        raise _no_case_error(scores_url, data_url, excluded, "scored", "run")

    labels = np.concatenate([t.labels for t in traces]) > 0
    scores = np.concatenate([t.scores for t in traces])
    positive = np.concatenate([t.positive for t in traces])
    sweeps = np.concatenate([layout.sweep_of_frame(np.arange(len(t.scores)), len(t.scores)) + 1 for t in traces])
    notes = [ac_note] if ac_note and is_seg else []
    if ac_note:
        notes.append("ACOUSLIC-AI metrics: no reference AC, so the challenge's NAE is 1 for every case")
        notes.append("paper-comparable frame metrics not computed: the paper counts frames of AC sweeps only, "
                     "which the circumference csv names")
    return Evaluation(metrics={
        "run": {"scores": scores_url, "data": data_url, "task": "seg" if is_seg else "cls",
                "models": sorted(set(frames["model"].to_pylist())), "evaluated_at": _now(),
                "cases_in_run": cases.num_rows, "cases_evaluated": len(traces), "cases_excluded": len(excluded),
                "notes": notes},
        "frame_metrics": frame_summary(labels, scores, positive),
        "frame_metrics_paper": None if ac_note else paper_frame_table(paper, "seg" if is_seg else "cls"),
        "per_sweep": [{"sweep": int(s), **_counts_at_positive(labels[sweeps == s], positive[sweeps == s])}
                      for s in np.unique(sweeps)],
        "case_metrics": {"aggregate": metrics.aggregate_case_metrics(per_case), "per_case": per_case},
        "acouslic": acouslic_section(acouslic, fov),
        "excluded_cases": excluded,
    }, traces=traces)


def frame_summary(labels: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> dict:
    """Frame metrics at the run's operating point, plus threshold-free ones and the best-F1 threshold.

    labels, positive : (N,) bool (ground truth; the run's prediction). scores : (N,) float.
    Counts, accuracy, precision, recall, F1 and specificity come from `positive`; AUROC and AUPRC (None
    with one class only) from `scores`. `threshold_between` is the interval the run's threshold must lie in
    ((highest score of a negative prediction, lowest score of a positive one]; an end is None when there is
    no such frame). `best_f1` is {threshold, f1, precision, recall} of `metrics.best_f1_threshold`.
    """
    summary = _counts_at_positive(labels, positive)
    ranked = metrics.frame_metrics(labels, scores, threshold=0.5)  # only its threshold-free entries are used
    best_threshold, _ = metrics.best_f1_threshold(labels, scores)
    at_best = metrics.frame_metrics(labels, scores, best_threshold)
    return {**summary, "auroc": ranked["auroc"], "auprc": ranked["auprc"],
            "predicted_positives": int(positive.sum()),
            "threshold_between": [float(scores[~positive].max()) if (~positive).any() else None,
                                  float(scores[positive].min()) if positive.any() else None],
            "best_f1": {key: at_best[key] for key in ("threshold", "f1", "precision", "recall")}}


def _counts_at_positive(labels: np.ndarray, positive: np.ndarray) -> dict:
    """`metrics.frame_metrics` of the bool predictions themselves (scored 0/1 at threshold 0.5), without
    its threshold-free entries, which are meaningless on 0/1 scores."""
    result = metrics.frame_metrics(labels, positive.astype(np.float64), threshold=0.5)
    keep = ("n", "positives", "tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "f1", "specificity")
    return {key: result[key] for key in keep}


def _unscored_cases(archive: dict, cases: pa.Table, errors: pa.Table) -> list[dict]:
    """Cases with a scoring error, and archive cases the run holds nothing for."""
    excluded, failed = [], set()
    for error in errors.to_pylist():
        case_id = error["case_id"]
        failed.add(case_id)
        excluded.append({"case_id": case_id, "source": error["source"], "reason": "scoring_error",
                         "message": f"{error['error']}: {error['message']}"})
    scored = set(cases["case_id"].to_pylist())
    for case_id in sorted(set(archive) - scored - failed):
        excluded.append({"case_id": case_id, "source": archive[case_id].source, "reason": "not_scored",
                         "message": "in the archive but in neither cases/ nor errors/ of the run "
                                    "(not in its input, or the run was interrupted: rerun score to complete it)"})
    return excluded


def _check_ref(case_ref: CaseRef | None, case_id: str) -> None:
    if case_ref is None:
        raise _Excluded("not_in_archive", f"case {case_id} is not in the --data archive")
    if case_ref.mask_uri is None:
        raise _Excluded("no_mask", f"no mask for case {case_id} in {layout.MASKS_DIR}/")


def _read_truth(case_ref: CaseRef, storage_options: StorageOptions) -> np.ndarray:
    """The (T, H, W) uint8 mask stack of an archive case (checked by `_check_ref`), or `_Excluded`."""
    try:
        return read_mask_stack(case_ref.mask_uri, None, storage_options)
    except InputError as err:
        raise _Excluded("mask_error", f"{err.kind}: {err}") from err


def _evaluate_case(case: dict, rows: dict | None, case_ref, circumferences: dict, is_seg: bool, fov: Fov,
                   storage_options: StorageOptions) -> tuple[CaseTrace, dict, dict, PaperFrames]:
    """Metrics of one scored case (trace, fetaliqa's case metrics, the challenge's, the paper's frames);
    raises `_Excluded` with the reason when it cannot be evaluated."""
    case_id, n = case["case_id"], case["frames"]
    _check_ref(case_ref, case_id)
    if rows is None or not np.array_equal(rows["frame"], np.arange(n)):
        found = 0 if rows is None else len(rows["frame"])
        raise _Excluded("frames_mismatch", f"cases/ says {n} frames; frames/ holds {found} rows, not frames 0..{n - 1}")
    gt = _read_truth(case_ref, storage_options)
    if gt.shape[0] != n:
        raise _Excluded("frames_mismatch", f"the mask has {gt.shape[0]} frames; the run scored {n}")

    scores, positive = rows["score"], rows["positive"]
    # the method selects its top frame when that frame is positive: a threshold that says just that
    top = int(np.argmax(scores))
    threshold = -np.inf if positive[top] else np.inf
    selected = challenge_format.select_positive_frame(scores, positive)
    try:
        mask = challenge_format.selected_mask(rows, selected, gt.shape[1:])
    except ValueError as err:
        raise _Excluded("mask_png", str(err)) from err
    reference = circumferences.get(case_id, [None] * layout.SWEEPS_PER_CASE)
    challenge_result = acouslic_case(case_id, gt, challenge_format.NO_FRAME if selected is None else selected, mask,
                                     reference, fov.for_case(case_ref, gt.shape[1:], storage_options))
    pred_mask = predicted_ac = reference_ac = None
    if is_seg:
        pred_mask, predicted_ac = mask, case["ac_mm"]
        known = [ac for ac in reference if ac is not None]
        reference_ac = (reference[layout.sweep_of_frame(selected, n)] if selected is not None
                        else (known[0] if known else None))
    result = metrics.case_metrics(scores, gt, pred_mask, reference_ac, predicted_ac, n // layout.SWEEPS_PER_CASE,
                                  threshold=threshold)
    labels = metrics.frame_annotation_labels(gt)
    truth = labels > 0
    per_case = {
        "case_id": case_id, "frames": n, "gt_positive_frames": int(truth.sum()),
        "predicted_positive_frames": int(positive.sum()),
        "tp": int((truth & positive).sum()), "fp": int((~truth & positive).sum()), "fn": int((truth & ~positive).sum()),
        "selected_frame": selected,
        "selected_sweep": None if selected is None else layout.sweep_of_frame(selected, n) + 1,
        "selected_label": None if selected is None else LABEL_NAMES[int(labels[selected])],
        "top_score": float(scores[top]),
        "selection_score": result["selection_score"], "nearest_dice": result["nearest_dice"],
        "relative_ac_error": result["relative_ac_error"],
        "predicted_ac_mm": None if predicted_ac is None or selected is None else float(predicted_ac),
        "reference_ac_mm": reference_ac,
    }
    trace = CaseTrace(case_id, scores.astype(np.float32), positive, labels, selected, list(reference))
    return trace, per_case, challenge_result, paper_frames(gt, rows, reference, is_seg)


def _count_reasons(excluded: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in excluded:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------- predictions


def evaluate_predictions(predictions_url: str, data_url: str, storage_options: StorageOptions = None,
                         fov: Fov | None = None) -> Evaluation:
    """The challenge's metrics of challenge-format predictions (`fetaliqa.evaluation.challenge_format`) against an archive.

    Every archive case is looked for as `<predictions_url>/<case_id>/`; sub-folders that are no archive case
    are excluded as `not_in_archive`. Returns an `Evaluation` without traces whose metrics are
    {"run", "acouslic", "excluded_cases"}. Raises `InputError` when no case can be evaluated at all, or the
    predictions folder does not exist.
    """
    so, fov = storage_options, fov or Fov()
    archive = list_cases(data_url, so)
    predicted = challenge_format.list_predictions(predictions_url, so)
    circumferences, ac_note = _circumferences(data_url, so)
    per_case, excluded = [], []
    for case in archive:
        try:
            per_case.append(_evaluate_prediction(case, predictions_url, predicted, circumferences, fov, so))
        except _Excluded as why:
            excluded.append({"case_id": case.case_id, "source": challenge_format.case_url(predictions_url, case.case_id),
                             "reason": why.reason, "message": why.message})
    for case_id in sorted(predicted - {case.case_id for case in archive}):
        excluded.append({"case_id": case_id, "source": challenge_format.case_url(predictions_url, case_id),
                         "reason": "not_in_archive",
                         "message": f"predicted case {case_id} is not in the --data archive"})
    if not per_case:
        raise _no_case_error(predictions_url, data_url, excluded, "predicted", "archive")
    notes = [f"{ac_note}; the challenge's NAE is 1 for every case"] if ac_note else []
    return Evaluation(metrics={
        "run": {"predictions": predictions_url, "data": data_url, "evaluated_at": _now(),
                "cases_in_archive": len(archive), "cases_evaluated": len(per_case), "cases_excluded": len(excluded),
                "notes": notes},
        "acouslic": acouslic_section(per_case, fov),
        "excluded_cases": excluded,
    }, traces=[])


def _evaluate_prediction(case: CaseRef, predictions_url: str, predicted: set[str], circumferences: dict, fov: Fov,
                         storage_options: StorageOptions) -> dict:
    """The challenge's metrics of one case's prediction; `_Excluded` with the reason when there are none."""
    if case.case_id not in predicted:
        raise _Excluded("not_predicted", f"no folder {challenge_format.case_url(predictions_url, case.case_id)}/")
    _check_ref(case, case.case_id)
    labels = _read_truth(case, storage_options)
    try:
        frame, mask = challenge_format.read_prediction(predictions_url, case.case_id, labels.shape, storage_options)
    except InputError as err:
        raise _Excluded("prediction_error", str(err)) from err
    reference = circumferences.get(case.case_id, [None] * layout.SWEEPS_PER_CASE)
    return acouslic_case(case.case_id, labels, frame, mask, reference,
                         fov.for_case(case, labels.shape[1:], storage_options))
