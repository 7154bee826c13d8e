"""ACOUSLIC-AI case metrics exactly as the challenge's own evaluation computes them.

The challenge's evaluation method is public (GitHub DIAGNijmegen/ACOUSLIC-AI-evaluation-method:
`evaluate.py` `process` / `aggregate_metrics` / `main`; `src/acouslicaieval/evaluation.py` `compute_wfss`,
`FetalAbdomenSegmentationEval.score_case`, `find_sweep_index`, `find_closest_annotated_frame`;
`src/acouslicaieval/ellipse_fitting.py` `fit_ellipses`; all as of its final commit ebf14b3, which scores
the soft Dice and widens the fan's edge in the ellipse fit, and follows 82eb9cb's halving of OpenCV's
axes). This module re-implements it rule for rule, odd corners included, so that its numbers are leaderboard
numbers; `fetaliqa.evaluation.metrics` keeps fetaliqa's own, cleaner rules.

Inputs of one case
------------------
labels : (T, H, W) uint8 label stack, 0 background, 1 optimal, 2 suboptimal. T = 6 sweeps x K frames;
    the sweep length is K = T // 6 (140 for ACOUSLIC, where the challenge hard-codes 0-140, ..., 700-840).
pred_mask : (H, W) bool or 0/1 mask the method gives for its selected frame (the challenge asserts a
    binary mask; so does this module).
selected_frame : 0-based frame index, or -1 (None is taken as -1) when the method selects nothing.
reference_acs : the case's 6 per-sweep reference ACs in mm, None (or NaN) where a sweep has none.
fov : (H, W) field-of-view mask; the challenge's `data/fov_mask.mha` is 562 x 744 float32, 1 inside.
    Non-zero is inside (`fov_from_images` derives one from an image stack).

The rules, each with the challenge's code it follows
----------------------------------------------------
Selected frame. Anything outside -1 .. T-1 raises ValueError (the challenge crashes there: an index
    error, or `evaluate_selected_frame`'s ValueError for -2 and below). With -1 the challenge replaces the
    submitted mask by an empty one (`process`), and so does `score_case` here.

WFSS (`compute_wfss`), in this order: 0 when the case has no annotated pixel at all, whatever is
    selected, abstaining (-1) included (fetaliqa.evaluation.metrics scores that abstention 1); 0 for -1 when the
    case has annotations; 1 when the selected frame holds a pixel labelled 1; 1 when it holds a 2 and
    the whole case holds no 1; 0.6 when it holds a 2 (and no 1) while the case has a 1 elsewhere; else 0.

Dice (`score_case`, key `DiceCoefficientSoft`, the one `main` scores). Every Dice is SimpleITK's
    `LabelOverlapMeasuresImageFilter.GetDiceCoefficient()`, called here exactly as the challenge calls
    it (uint8 images, truth first), so every degenerate value is SimpleITK's own:
    * truth = labels[selected_frame] > 0. Frame -1 is a Python index: the truth is the LAST frame of
      the stack (the last frame of sweep 6), against the empty prediction.
    * Both truth and prediction are multiplied by the FOV mask (the FOV cast to uint8 as SimpleITK's
      caster does, i.e. truncated, then `SimpleITK.Mask`: non-zero is inside). A prediction spilling
      outside the fan costs nothing.
    * Masked truth and masked prediction both non-empty: their Dice.
    * Masked prediction empty (nothing selected, a prediction wholly outside the fan, or an empty mask):
      the Dice of the masked truth against nothing. That is 0 when the truth has pixels; when both are
      empty it is what SimpleITK returns for two empty label images, `EMPTY_DICE`: inf with SimpleITK
      2.5.7 (ITK's union overlap of no pixels is the largest double, and its Dice 2 uo / (1 + uo)
      overflows). So abstaining (-1) scores Dice inf whenever the stack's last frame is unannotated
      (nearly always), as does an empty prediction on an unannotated frame; and since the aggregation
      is a plain mean, one such case makes the submission's mean Dice and score inf. This module does
      the same; the challenge's requirements.txt does not pin SimpleITK, so its container may differ.
    * Masked truth empty but masked prediction not (an unannotated selected frame, or one whose
      annotation lies wholly outside the fan): the nearest annotated frame of the same sweep within
      +-15 frames is looked for in the UNMASKED label stack. The search window is
      max(sweep start, f - 15) .. min(sweep end - 1, f + 15); the first annotated frame going forward and
      the first going backward are found, and the PREVIOUS one wins whenever it exists, even when the
      next one is nearer. Its Dice, truth NOT masked by the FOV (the prediction still is), is weighted
      by 1 - |d| / 15 (so 0 at d = 15). With no annotated frame in the window the Dice stays that of
      the empty masked truth against the prediction: 0.
    Whether a masked image is "empty" is decided on its pixels. The challenge writes `np.any(image)` on
    SimpleITK images; they export no array interface, but numpy converts them through their iterator
    into a 1-D array of all pixel values (checked with SimpleITK 2.5.7), so the test is on the pixels
    and the branches above are the ones it takes (slowly, pixel by pixel).

AC of the prediction (`fit_ellipses` + `calculate_ellipse_circumference_mm`, as of the challenge's final
    commit ebf14b3): the mask and the FOV, each made 0/255, are zero-padded by 200 px on every side, the
    mask is multiplied by the FOV; the outlines (all contours of RETR_TREE / CHAIN_APPROX_SIMPLE, drawn
    1 px wide) of the masked mask and of the FOV are drawn; the FOV's outline is dilated by a 3 x 3
    square kernel, 3 times (a band of chessboard radius 3 px around the fan's edge), and the mask's
    outline pixels inside that band are dropped. So a region cut by the fan's edge keeps only its real
    boundary, even where the prediction stops 1-3 px short of the edge, and the fit extrapolates the
    ellipse past the cut; the real boundary loses its last 3 px before the edge too. (Before ebf14b3 only
    the pixels on the undilated outline were dropped, so a cut 1-3 px inside the fan was fitted as
    boundary.) The largest contour (`cv2.contourArea`, the first on a tie) of what remains
    (RETR_LIST / CHAIN_APPROX_NONE) needs more than 5 points; `cv2.fitEllipse` gives full axes (w, h),
    a = w / 2 and b = h / 2, and the perimeter is Ramanujan's FIRST formula
    pi (3 (a + b) - sqrt((3a + b)(a + 3b))), times 0.28 mm per pixel. No region, too few points or a
    NaN axis: no AC (None). fetaliqa.ellipse differs: no FOV, largest external contour, Ramanujan's second
    formula, per-axis spacing.

NAE (`process`): 1 when the prediction has no AC, or the selected sweep has no reference AC, or
    nothing is selected (no sweep, hence no reference; and the empty mask has no AC); otherwise
    |ref - pred| / max(ref, pred, 1e-6). A NaN reference counts as missing (the challenge's JSON holds
    null there; fetaliqa's CSV may give NaN).

Aggregation (`aggregate_metrics` + `main`): plain means over all cases (np.mean, so a NaN or inf
    case value propagates), and score = 0.5 (1 - mean NAE) + 0.25 mean Dice + 0.25 mean WFSS. The
    challenge also reports standard deviations (and a "std" of the score that is not one); only means
    are computed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import SimpleITK as sitk

from fetaliqa.inputs.layout import MASK_OPTIMAL, MASK_SUBOPTIMAL, SWEEPS_PER_CASE

SPACING_MM = 0.28  # the challenge's PIXEL_SPACING, isotropic
FRAME_TOLERANCE = 15  # the challenge's MAX_FRAME_TOLERANCE, in frames
FIT_PADDING = 200  # px of zero padding around mask and FOV before the contour work
FOV_EDGE_BAND = 3  # 3 x 3 dilations of the FOV's outline: mask outline this near the fan's edge is not fitted
NAE_EPSILON = 1e-6
NO_FRAME = -1
CASE_KEYS = ("wfss", "soft_dice", "nae_ac")


def _overlap_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """SimpleITK's label-overlap Dice of two (H, W) bool masks (truth as the source image)."""
    images = [sitk.GetImageFromArray(np.ascontiguousarray(m, dtype=np.uint8)) for m in (truth, pred)]
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.SetNumberOfThreads(1)
    overlap.Execute(*images)
    return float(overlap.GetDiceCoefficient())


def _empty_dice() -> float:
    """What SimpleITK's filter returns for two empty masks (measured, not assumed)."""
    empty = np.zeros((2, 2), dtype=bool)
    return _overlap_dice(empty, empty)


EMPTY_DICE = _empty_dice()  # the challenge's Dice of an empty truth against an empty prediction


# ---------------------------------------------------------------- inputs

def fov_from_images(images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """FOV mask (H, W) bool of an image stack (T, H, W) (or one (H, W) frame): pixels non-zero in any frame.

    Scanned `chunk` frames at a time, so that no (T, H, W) temporary is made.
    """
    images = np.asarray(images)
    if images.ndim == 2:
        return images != 0
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be (T, H, W) with T > 0 or (H, W), got shape {images.shape}")
    fov = np.zeros(images.shape[1:], dtype=bool)
    for start in range(0, images.shape[0], chunk):
        fov |= (images[start:start + chunk] != 0).any(axis=0)
    return fov


def read_fov_mask(path: str) -> np.ndarray:
    """The FOV mask stored in an image file (the challenge's `fov_mask.mha`), as its (H, W) array."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if array.ndim != 2:
        raise ValueError(f"FOV mask must be 2-D, got shape {array.shape} from {path}")
    return array


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[0] == 0:
        raise ValueError(f"labels must be (T, H, W) with T > 0, got shape {labels.shape}")
    if labels.shape[0] % SWEEPS_PER_CASE:
        raise ValueError(f"labels hold {labels.shape[0]} frames, not {SWEEPS_PER_CASE} sweeps of equal length")
    return labels


def _check_frame(selected_frame: int | None, n_frames: int) -> int:
    frame = NO_FRAME if selected_frame is None else int(selected_frame)
    if not NO_FRAME <= frame < n_frames:
        raise ValueError(f"selected frame {selected_frame} outside -1..{n_frames - 1}")
    return frame


def _fov_for_dice(fov: np.ndarray, shape: tuple) -> np.ndarray:
    """FOV as the challenge's Dice sees it: cast to uint8 (truncating, like SimpleITK's caster), non-zero."""
    fov = np.asarray(fov)
    if fov.shape != shape:
        raise ValueError(f"FOV mask {fov.shape} does not match frames {shape}")
    return fov.astype(np.uint8) != 0


def _binary_prediction(pred_mask: np.ndarray, shape: tuple) -> np.ndarray:
    pred = np.asarray(pred_mask)
    if pred.shape != shape:
        raise ValueError(f"predicted mask {pred.shape} does not match frames {shape}")
    if not np.isin(pred, (0, 1)).all():  # the challenge asserts a binary mask
        raise ValueError("predicted mask must be bool or 0/1")
    return pred.astype(bool)


def sweep_of(frame: int, n_frames: int) -> int | None:
    """0-based sweep of a frame (K = n_frames // 6 frames a sweep); None for -1 (no frame selected)."""
    if frame == NO_FRAME:
        return None
    return frame // (n_frames // SWEEPS_PER_CASE)


# ---------------------------------------------------------------- WFSS

def wfss(selected_frame: int | None, labels: np.ndarray) -> float:
    """The challenge's weighted frame selection score of one case (rules in the module docstring).

    selected_frame : 0-based index or -1 (None) for no selection. labels : (T, H, W) uint8 in {0, 1, 2}.
    """
    labels = _check_labels(labels)
    frame = _check_frame(selected_frame, labels.shape[0])
    # Per-frame maxima scan the stack once without a (T, H, W) temporary; only annotated frames are
    # then looked at pixel by pixel.
    frame_max = labels.reshape(labels.shape[0], -1).max(axis=1)
    if frame_max.max() > MASK_SUBOPTIMAL:
        raise ValueError(f"labels must be 0, 1 or 2, found {frame_max.max()}")
    annotated = np.flatnonzero(frame_max)
    if annotated.size == 0:
        return 0.0  # no annotation in the case: 0, even for abstaining
    if frame == NO_FRAME:
        return 0.0
    has_optimal = bool((labels[frame] == MASK_OPTIMAL).any())
    has_suboptimal = bool((labels[frame] == MASK_SUBOPTIMAL).any())
    case_has_optimal = any((labels[f] == MASK_OPTIMAL).any() for f in annotated)
    if has_optimal or (has_suboptimal and not case_has_optimal):
        return 1.0
    if has_suboptimal:
        return 0.6
    return 0.0


# ---------------------------------------------------------------- Dice

def nearest_annotated_frame(labels: np.ndarray, frame: int,
                            tolerance: int = FRAME_TOLERANCE) -> int | None:
    """The challenge's choice of annotated frame for an unannotated selected `frame` (0-based).

    Within the frame's sweep and `tolerance` frames either side, the first annotated frame (any
    non-zero label, no FOV) going backward wins when there is one; else the first going forward;
    else None. The previous frame wins even when the next one is nearer.
    """
    labels = _check_labels(labels)
    n_frames = labels.shape[0]
    frame = _check_frame(frame, n_frames)
    if frame == NO_FRAME:
        raise ValueError("no frame selected: there is no sweep to search")
    per_sweep = n_frames // SWEEPS_PER_CASE
    start = sweep_of(frame, n_frames) * per_sweep
    end = start + per_sweep  # exclusive
    for previous in range(frame - 1, max(start, frame - tolerance) - 1, -1):
        if labels[previous].any():
            return previous
    for following in range(frame + 1, min(end, frame + tolerance + 1)):
        if labels[following].any():
            return following
    return None


def soft_dice(selected_frame: int | None, pred_mask: np.ndarray | None, labels: np.ndarray,
              fov: np.ndarray) -> tuple[float, int]:
    """The challenge's Dice of one case (its `DiceCoefficientSoft`), rules in the module docstring.

    selected_frame : 0-based index, or -1 / None for no selection (the prediction is then empty
        whatever `pred_mask` holds, and may be None).
    pred_mask : (H, W) bool or 0/1 mask of the selected frame.
    labels : (T, H, W) uint8 in {0, 1, 2}. fov : (H, W), non-zero inside.

    Returns (dice, truth_frame): the Dice and the index of the label frame it was measured against
    (the selected frame, T - 1 for -1, or the nearest annotated frame).
    """
    labels = _check_labels(labels)
    n_frames, shape = labels.shape[0], labels.shape[1:]
    frame = _check_frame(selected_frame, n_frames)
    fov = _fov_for_dice(fov, shape)
    pred = np.zeros(shape, bool) if frame == NO_FRAME else _binary_prediction(pred_mask, shape)
    truth_frame = frame % n_frames  # -1 reads the last frame, as the challenge's gt_array[-1] does
    truth = (labels[truth_frame] > 0) & fov
    pred &= fov
    if truth.any() or not pred.any():
        return _overlap_dice(truth, pred), truth_frame
    # An empty (masked) truth against a non-empty (masked) prediction: the nearest annotated frame.
    nearest = nearest_annotated_frame(labels, frame)
    if nearest is None:
        return _overlap_dice(truth, pred), truth_frame
    weight = 1 - abs(nearest - frame) / FRAME_TOLERANCE
    return _overlap_dice(labels[nearest] > 0, pred) * weight, nearest  # truth NOT masked by the FOV


# ---------------------------------------------------------------- AC and NAE

def ramanujan_first(a: float, b: float) -> float:
    """Ramanujan's first approximation of the perimeter of an ellipse of semi-axes a, b."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def _outline(binary: np.ndarray) -> np.ndarray:
    """1-px outline image of every contour (RETR_TREE, CHAIN_APPROX_SIMPLE) of a 0/255 uint8 image."""
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    outline = np.zeros_like(binary)
    cv2.drawContours(outline, contours, -1, 255, 1)
    return outline


def outline_to_fit(mask: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """The outline pixels of `mask` (H, W) inside `fov` (H, W) that the challenge fits its ellipse to:
    (H + 2 FIT_PADDING, W + 2 FIT_PADDING) bool, True where the masked mask's outline lies farther than
    FOV_EDGE_BAND px (chessboard) from the FOV's outline."""
    mask, fov = np.asarray(mask), np.asarray(fov)
    if mask.ndim != 2 or mask.shape != fov.shape:
        raise ValueError(f"mask {mask.shape} and FOV {fov.shape} must be equal (H, W) shapes")
    pad = FIT_PADDING
    fov_255 = np.pad(np.where(fov != 0, 255, 0).astype(np.uint8), pad)
    inside = np.pad(mask != 0, pad) & (fov_255 != 0)
    mask_255 = np.where(inside, 255, 0).astype(np.uint8)
    # A prediction often stops a pixel or two short of the fan's edge: that cut is no boundary either.
    edge_band = cv2.dilate(_outline(fov_255), np.ones((3, 3), np.uint8), iterations=FOV_EDGE_BAND)
    return (_outline(mask_255) != 0) & (edge_band == 0)


def fitted_ellipse(mask: np.ndarray, fov: np.ndarray):
    """The challenge's ellipse fitted to `mask` (H, W) inside `fov` (H, W), on `outline_to_fit`'s pixels:
    OpenCV's ((cx, cy), (w, h), angle), in coordinates padded by FIT_PADDING px, or None when no ellipse
    can be fitted."""
    outline = np.where(outline_to_fit(mask, fov), 255, 0).astype(np.uint8)
    contours, _ = cv2.findContours(outline, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)  # max keeps the first on a tie
    if len(largest) <= 5:
        return None
    ellipse = cv2.fitEllipse(largest)
    if any(math.isnan(axis) for axis in ellipse[1]):
        return None
    return ellipse


def circumference_mm(mask: np.ndarray, fov: np.ndarray, spacing_mm: float = SPACING_MM) -> float | None:
    """The challenge's AC in mm of a predicted (H, W) mask: the fit of `fitted_ellipse`, a and b half of
    OpenCV's full axes, Ramanujan's first formula, times `spacing_mm`; None when nothing can be fitted."""
    ellipse = fitted_ellipse(mask, fov)
    if ellipse is None:
        return None
    width, height = ellipse[1]
    return ramanujan_first(width / 2, height / 2) * spacing_mm


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def nae(predicted_mm: float | None, reference_mm: float | None) -> float:
    """The challenge's normalised absolute AC error: 1 when either AC is missing (None or NaN), else
    |reference - predicted| / max(reference, predicted, 1e-6)."""
    if _missing(predicted_mm) or _missing(reference_mm):
        return 1.0
    return abs(reference_mm - predicted_mm) / max(reference_mm, predicted_mm, NAE_EPSILON)


# ---------------------------------------------------------------- a case, and a submission

def score_case(labels: np.ndarray, pred_mask: np.ndarray | None, selected_frame: int | None,
               reference_acs: Sequence[float | None], fov: np.ndarray,
               spacing_mm: float = SPACING_MM) -> dict:
    """The challenge's metrics of one case.

    labels : (T, H, W) uint8 in {0, 1, 2}. pred_mask : (H, W) bool or 0/1 mask of the selected frame
    (ignored, and may be None, when nothing is selected). selected_frame : 0-based, or -1 / None.
    reference_acs : 6 per-sweep reference ACs in mm, None or NaN where missing. fov : (H, W).

    Returns {"frame", "wfss", "soft_dice", "nae_ac", "ac_mm", "reference_ac_mm"}: the selected frame
    (-1 for none), the three case metrics, the predicted AC (None when no ellipse was fitted) and the
    reference AC of the selected sweep (None when missing or nothing is selected).
    """
    labels = _check_labels(labels)
    n_frames = labels.shape[0]
    frame = _check_frame(selected_frame, n_frames)
    if len(reference_acs) != SWEEPS_PER_CASE:
        raise ValueError(f"need {SWEEPS_PER_CASE} reference ACs, got {len(reference_acs)}")
    sweep = sweep_of(frame, n_frames)
    reference = None if sweep is None or _missing(reference_acs[sweep]) else float(reference_acs[sweep])
    if frame == NO_FRAME:
        ac = None  # the challenge measures an empty mask: no ellipse
    else:
        ac = circumference_mm(_binary_prediction(pred_mask, labels.shape[1:]), fov, spacing_mm)
    dice_value, _ = soft_dice(frame, pred_mask, labels, fov)
    return {"frame": frame, "wfss": wfss(frame, labels), "soft_dice": dice_value,
            "nae_ac": nae(ac, reference), "ac_mm": ac, "reference_ac_mm": reference}


def aggregate(per_case: Sequence[dict]) -> dict:
    """The challenge's submission metrics: plain means (np.mean) of wfss, soft_dice and nae_ac over all
    cases, and score = 0.5 (1 - nae_ac) + 0.25 soft_dice + 0.25 wfss."""
    if not per_case:
        raise ValueError("no cases to aggregate")
    means = {key: float(np.mean([case[key] for case in per_case])) for key in CASE_KEYS}
    means["score"] = 0.5 * (1 - means["nae_ac"]) + 0.25 * means["soft_dice"] + 0.25 * means["wfss"]
    return means
