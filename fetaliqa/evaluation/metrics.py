"""fetaliqa's metrics, pure functions on numpy arrays: frame classification (CLS and SEG) and cases.

Frame metrics score every frame: labels (N,) bool or 0/1 (a frame is positive when its mask is
non-empty), scores (N,) float in [0, 1]. A frame is predicted positive when `score >= threshold`;
every threshold in this module (frame scores, SEG area fractions) uses that same `>=`.

Case metrics score the ONE frame a method selects per case, and its mask, in the spirit of the ACOUSLIC-AI
challenge but by fetaliqa's own rules, and under names of their own so that they cannot be mistaken for
the challenge's (`fetaliqa.evaluation.acouslic`: `wfss`, `soft_dice`, `nae_ac`, leaderboard numbers):
- `selection_score`: the challenge's WFSS weights (1 optimal, 0.6 suboptimal beside an optimal frame), but
  abstaining on a case with no annotation at all scores 1 (the challenge: 0);
- `nearest_dice`: Dice of the selected mask against the nearest annotated frame of its sweep within 15
  frames, unweighted and without the FOV (the challenge weights it by 1 - distance / 15 and masks both
  masks with the FOV);
- `relative_ac_error`: |predicted - reference| / reference, None without a reference (the challenge divides
  by max(reference, prediction) and scores 1 without a reference).
The rules are stated in each docstring.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix,
                             precision_recall_curve, precision_recall_fscore_support, recall_score,
                             roc_auc_score)

from fetaliqa.inputs.layout import MASK_BACKGROUND, MASK_OPTIMAL, MASK_SUBOPTIMAL

# SEG: a frame is positive when its predicted mask covers >= this fraction of the image; 0.1% to 5%.
AREA_THRESHOLDS = np.round(np.arange(0.001, 0.0501, 0.001), 4)
FRAME_TOLERANCE = 15  # the challenge's window, in frames, for the nearest annotated frame
CASE_METRIC_KEYS = ("selection_score", "nearest_dice", "relative_ac_error")
# (key in a metrics dict, column header) of the paper's results table
PAPER_COLUMNS = (("accuracy", "acc"), ("f1", "F1"), ("precision", "precision"), ("recall", "recall"))
TRAINABLE_COLUMN = ("trainable_parameters", "trainable")


# ---------------------------------------------------------------- frame classification

def _binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty (N,) array, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be bool or 0/1")
    return labels.astype(bool)


def _scores_like(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores


def _counts(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """tp, fp, tn, fn (ints) and precision, recall, F1 of bool predictions (N,) against labels (N,)."""
    # labels=[False, True] keeps the matrix 2x2 when only one class is present
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[False, True]).ravel()
    # zero_division=0: no predicted positive -> precision 0; no positive label -> recall 0; and F1 0
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="binary",
                                                               zero_division=0)
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
            "precision": float(precision), "recall": float(recall), "f1": float(f1)}


def frame_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, strict: bool = False) -> dict:
    """Classification metrics of frame scores at `threshold` (positive prediction: score >= threshold, or
    score > threshold when `strict`, the paper's code's rule).

    Parameters
    ----------
    labels : (N,) bool or 0/1 array, N > 0. True where the frame's mask is non-empty.
    scores : (N,) float array in [0, 1].
    threshold : float.

    Returns
    -------
    dict with accuracy, f1, precision, recall, specificity, auroc, auprc (floats), tp, fp, tn, fn,
    n, positives (ints) and threshold. Degenerate cases, by rule: precision is 0 when nothing is
    predicted positive; recall and F1 are 0 when no label is positive (sklearn's zero_division=0);
    specificity is 0 when no label is negative; auroc and auprc (average precision) are None when
    the labels hold one class only, where neither is defined.
    """
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    predicted = scores > threshold if strict else scores >= threshold
    both_classes = 0 < labels.sum() < labels.size
    return {"accuracy": float(accuracy_score(labels, predicted)),
            **_counts(labels, predicted),
            # specificity is the recall of the negative class
            "specificity": float(recall_score(labels, predicted, pos_label=False, zero_division=0)),
            "auroc": float(roc_auc_score(labels, scores)) if both_classes else None,
            "auprc": float(average_precision_score(labels, scores)) if both_classes else None,
            "threshold": float(threshold), "n": int(labels.size), "positives": int(labels.sum())}


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Threshold that maximises F1 (used with `>=`), chosen on validation frames.

    labels : (N,) bool or 0/1 array, N > 0; scores : (N,) float array.
    Returns (threshold, f1). The threshold is one of the scores, so `frame_metrics` at that threshold
    reproduces that F1. Ties go to the highest threshold: the fewest frames flagged for the same F1.
    With no positive label every threshold scores F1 0 and the highest score is returned.
    """
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    if not labels.any():
        return float(scores.max()), 0.0
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # the curve's last point (precision 1, recall 0) has no threshold: drop it
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    # thresholds increase, so the last index within rounding of the maximum is the highest threshold
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]
    return float(thresholds[best]), float(f1[best])


def area_threshold_sweep(labels: np.ndarray, area_fractions: np.ndarray,
                         thresholds: np.ndarray = AREA_THRESHOLDS) -> list[dict]:
    """SEG frame metrics at each area-fraction threshold: positive when area_fraction >= threshold.

    labels : (N,) bool or 0/1 array, N > 0.
    area_fractions : (N,) float array in [0, 1]: predicted mask pixels / image pixels per frame.
    thresholds : (K,) float array; default 0.001, 0.002, ..., 0.050 (0.1% to 5%).
    Returns K dicts, in the order of `thresholds`, with threshold, f1, precision, recall, tp, fp, tn, fn and
    the zero_division=0 rules of `frame_metrics`.
    """
    labels = _binary_labels(labels)
    area_fractions = _scores_like(area_fractions, labels)
    return [{"threshold": float(t), **_counts(labels, area_fractions >= t)} for t in thresholds]


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient 2|P & T| / (|P| + |T|) of two binary masks; 1.0 when both are empty.

    pred, target : (H, W) (or any equal shape) bool or 0/1 arrays; non-zero counts as foreground.
    """
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} and {target.shape}")
    # This is the pixel-wise F1; counted with numpy since sklearn's f1_score would copy the masks
    # through its input validation, for ~420k pixels per ACOUSLIC frame.
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, target).sum()) / total


# ---------------------------------------------------------------- trials and the paper's table

def pooled_f_score(overlap: int, predicted: int, truth: int) -> float | None:
    """One pixel F-score (Dice) pooled over many masks, the paper's SEG Dice: 2 |P & T| / (|P| + |T|) from
    the summed pixel counts; None when neither side has a pixel."""
    return 2 * overlap / (predicted + truth) if predicted + truth else None


def mean_std_table(runs: list[dict], keys=("accuracy", "f1", "precision", "recall")) -> dict:
    """Mean and sample standard deviation (ddof=1) of each key over K runs (`--trials K`).

    runs : K >= 1 metric dicts, each holding a number under every key of `keys`.
    Returns {key: (mean, std)}, floats; std is 0.0 for a single run.
    """
    if not runs:
        raise ValueError("no runs to summarise")
    table = {}
    for key in keys:
        values = np.array([run[key] for run in runs], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        table[key] = (float(values.mean()), std)
    return table


def format_paper_table(rows: dict) -> str:
    """Markdown table like the paper's: | model | acc | F1 | precision | recall | [trainable |].

    rows : {model name: {key: (mean, std)}} as `mean_std_table` returns; a missing key prints "-"
        (the paper's SEG row has no accuracy). The trainable column appears when any row holds
        "trainable_parameters" (counts, printed as "2,360,065 ± 0"). Returns one line per model, metric
        cells as "0.7570 ± 0.0123", ending with a newline.
    """
    columns = PAPER_COLUMNS
    if any(TRAINABLE_COLUMN[0] in table for table in rows.values()):
        columns += (TRAINABLE_COLUMN,)
    lines = ["| model | " + " | ".join(header for _, header in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, table in rows.items():
        cells = [("-" if key not in table else f"{table[key][0]:,.0f} ± {table[key][1]:,.0f}"
                  if key == TRAINABLE_COLUMN[0] else f"{table[key][0]:.4f} ± {table[key][1]:.4f}")
                 for key, _ in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- ACOUSLIC-AI case metrics

def frame_annotation_labels(gt_masks: np.ndarray) -> np.ndarray:
    """Per-frame label (T,) uint8 of a mask stack (T, H, W) uint8 in {0, 1, 2}.

    A frame holds one abdomen, so one non-zero label; were both present, optimal (1) wins, as in the
    challenge's check of a selected frame.
    """
    gt_masks = np.asarray(gt_masks)
    if gt_masks.ndim != 3:
        raise ValueError(f"gt_masks must be (T, H, W), got shape {gt_masks.shape}")
    labels = gt_masks.max(axis=(1, 2), initial=0).astype(np.uint8)
    if labels.size and labels.max() > MASK_SUBOPTIMAL:
        raise ValueError(f"mask labels must be 0, 1 or 2, found {labels.max()}")
    for f in np.flatnonzero(labels == MASK_SUBOPTIMAL):  # only the few annotated frames are rescanned
        if (gt_masks[f] == MASK_OPTIMAL).any():
            labels[f] = MASK_OPTIMAL
    return labels


def select_frame_at_threshold(scores: np.ndarray, threshold: float) -> int | None:
    """The frame a method selects from its scores (T,): the highest-scoring one (the first on a tie),
    or None when even that scores below `threshold`."""
    scores = np.asarray(scores, dtype=np.float64)
    best = int(np.argmax(scores))
    return best if scores[best] >= threshold else None


def _check_frame(frame: int, n_frames: int) -> None:
    if not 0 <= frame < n_frames:  # a negative index must not wrap around to the end of the stack
        raise ValueError(f"selected frame {frame} outside 0..{n_frames - 1}")


def selection_score(selected_frame: int | None, gt_labels: np.ndarray) -> float:
    """Weighted frame selection score of one case.

    selected_frame : 0-based frame index, or None when the method says no frame is measurable.
    gt_labels : (T,) int array in {0, 1, 2}, each frame's mask label (`frame_annotation_labels`).
    Returns a float, by this rule: 1.0 for an optimal frame; for a suboptimal frame 0.6 when the case has an
    optimal frame, 1.0 when it has none (the suboptimal frame is then the best available); 0.0 for a
    frame without annotation. With nothing selected: 1.0 when the case has no annotated frame at all
    (abstaining was right), else 0.0.
    """
    gt_labels = np.asarray(gt_labels)
    if selected_frame is None:
        return 0.0 if (gt_labels != MASK_BACKGROUND).any() else 1.0
    _check_frame(selected_frame, len(gt_labels))
    label = gt_labels[selected_frame]
    if label == MASK_OPTIMAL:
        return 1.0
    if label == MASK_SUBOPTIMAL:
        return 0.6 if (gt_labels == MASK_OPTIMAL).any() else 1.0
    return 0.0


def nearest_annotation_dice(selected_frame: int | None, pred_mask: np.ndarray, gt_masks: np.ndarray,
                           frames_per_sweep: int, window: int = FRAME_TOLERANCE) -> float:
    """Dice of the selected frame's mask against the nearest annotated frame of the same sweep.

    Parameters
    ----------
    selected_frame : 0-based frame index, or None when nothing is selected.
    pred_mask : (H, W) bool, the method's mask for the selected frame.
    gt_masks : (T, H, W) uint8 in {0, 1, 2}; any non-zero label counts as foreground.
    frames_per_sweep : K; frame f lies in sweep f // K.
    window : the largest distance |f - selected_frame| (inclusive) at which an annotated frame counts.

    Returns
    -------
    float: Dice (not a probabilistic soft Dice; the name is the challenge's) against the annotated
    frame nearest to the selected one (itself if annotated; on a tie, the earlier) within `window`
    frames and in the same sweep; 0.0 when there is none. With nothing selected: 1.0 when the case
    has no annotated frame at all, else 0.0.
    """
    gt_masks = np.asarray(gt_masks)
    if selected_frame is None:
        return 0.0 if gt_masks.any() else 1.0
    if frames_per_sweep < 1 or window < 0:
        raise ValueError(f"need frames_per_sweep >= 1, window >= 0; got {frames_per_sweep}, {window}")
    _check_frame(selected_frame, len(gt_masks))
    sweep_start = (selected_frame // frames_per_sweep) * frames_per_sweep
    first = max(sweep_start, selected_frame - window)
    last = min(sweep_start + frames_per_sweep, len(gt_masks), selected_frame + window + 1)
    # only the frames in the window are scanned, not the whole stack
    annotated = first + np.flatnonzero(gt_masks[first:last].reshape(last - first, -1).any(axis=1))
    if annotated.size == 0:
        return 0.0
    nearest = annotated[np.argmin(np.abs(annotated - selected_frame))]  # argmin: earlier wins a tie
    return dice(pred_mask, gt_masks[nearest] != MASK_BACKGROUND)


def relative_ac_error(predicted_mm: float | None, reference_mm: float | None) -> float | None:
    """Normalised absolute error |predicted - reference| / reference of the abdominal circumference.

    predicted_mm, reference_mm : float (mm) or None. Returns None when the reference is missing (not
    scored on AC); 1.0 when it exists but nothing was predicted (scored like a 100% error).
    """
    if reference_mm is None:
        return None
    if reference_mm <= 0:
        raise ValueError(f"reference AC must be positive, got {reference_mm}")
    if predicted_mm is None:
        return 1.0
    return abs(predicted_mm - reference_mm) / reference_mm


def case_metrics(scores: np.ndarray, gt_masks: np.ndarray, pred_mask_of_best: np.ndarray | None,
                 reference_ac_mm: float | None, predicted_ac_mm: float | None, frames_per_sweep: int,
                 *, threshold: float, window: int = FRAME_TOLERANCE) -> dict:
    """fetaliqa's case metrics of one case: the method selects its highest-scoring frame.

    Parameters
    ----------
    scores : (T,) float array, one score per frame of the case.
    gt_masks : (T, H, W) uint8 in {0, 1, 2}.
    pred_mask_of_best : (H, W) bool mask of the selected frame (SEG); None for a method without masks
        (CLS). A SEG method that selects nothing should pass an empty mask, not None, so that its
        abstention is scored.
    reference_ac_mm : reference AC of the selected frame's sweep (find it with `select_frame_at_threshold`), or
        None where the sweep has none.
    predicted_ac_mm : the method's AC of the selected frame, or None.
    frames_per_sweep : K; frame f lies in sweep f // K.
    threshold : no frame is selected when the highest score is below it.
    window : see `nearest_annotation_dice`.

    Returns
    -------
    dict: selected_frame (`select_frame_at_threshold`), selection_score, nearest_dice (None without a
    predicted mask) and relative_ac_error (None without a reference). A method that selects nothing measures nothing: its predicted
    AC is ignored.
    """
    if np.shape(scores) != (len(gt_masks),):
        raise ValueError(f"scores {np.shape(scores)} do not match {len(gt_masks)} mask frames")
    selected = select_frame_at_threshold(scores, threshold)
    soft = (None if pred_mask_of_best is None else
            nearest_annotation_dice(selected, pred_mask_of_best, gt_masks, frames_per_sweep, window))
    return {"selected_frame": selected,
            "selection_score": selection_score(selected, frame_annotation_labels(gt_masks)),
            "nearest_dice": soft,
            "relative_ac_error": relative_ac_error(predicted_ac_mm if selected is not None else None, reference_ac_mm)}


def aggregate_case_metrics(cases: list[dict]) -> dict:
    """Mean of each case metric over cases, ignoring None; None where no case has a value.

    cases : dicts from `case_metrics`. Returns {"cases": count, "selection_score", "nearest_dice", "relative_ac_error": means}.
    """
    summary = {"cases": len(cases)}
    for key in CASE_METRIC_KEYS:
        values = [case[key] for case in cases if case.get(key) is not None]
        summary[key] = float(np.mean(values)) if values else None
    return summary
