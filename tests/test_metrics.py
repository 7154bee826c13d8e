"""Metrics against answers worked out by hand (each in a comment next to its case)."""

import numpy as np
import pytest

from fetaliqa.evaluation.metrics import (AREA_THRESHOLDS, aggregate_case_metrics, area_threshold_sweep,
                              best_f1_threshold, case_metrics, dice, format_paper_table,
                              frame_annotation_labels, frame_metrics, mean_std_table, relative_ac_error,
                              select_frame_at_threshold, nearest_annotation_dice,
                              selection_score)

# Hand case. Sorted by score: 0.95 N, 0.9 P, 0.7 P, 0.55 N, 0.4 P, 0.3 N, 0.2 N, 0.1 N.
LABELS = np.array([1, 1, 0, 0, 1, 0, 0, 0])
SCORES = np.array([0.9, 0.4, 0.95, 0.2, 0.7, 0.1, 0.3, 0.55])


def test_frame_metrics_every_key_on_a_hand_case():
    m = frame_metrics(LABELS, SCORES, 0.5)
    # predicted (>= 0.5): [1, 0, 1, 0, 1, 0, 0, 1]
    # tp: frames 0, 4 -> 2; fp: frames 2, 7 -> 2; fn: frame 1 -> 1; tn: frames 3, 5, 6 -> 3
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 3, 1)
    assert all(type(m[k]) is int for k in ("tp", "fp", "tn", "fn", "n", "positives"))
    assert (m["n"], m["positives"], m["threshold"]) == (8, 3, 0.5)
    assert m["accuracy"] == pytest.approx(5 / 8)     # (2 + 3) / 8 = 0.625
    assert m["precision"] == pytest.approx(2 / 4)    # tp / (tp + fp) = 0.5
    assert m["recall"] == pytest.approx(2 / 3)       # tp / (tp + fn) = 0.6667
    assert m["f1"] == pytest.approx(4 / 7)           # 2*2 / (2*2 + 2 + 1) = 0.5714
    assert m["specificity"] == pytest.approx(3 / 5)  # tn / (tn + fp) = 0.6
    # AUROC, concordant (positive, negative) pairs of 3 x 5 = 15: 0.9 beats 4 negatives (not 0.95),
    # 0.7 beats 4, 0.4 beats 0.3, 0.2, 0.1 -> 3; (4 + 4 + 3) / 15 = 11/15 = 0.7333
    assert m["auroc"] == pytest.approx(11 / 15)
    # AP: positives at ranks 2, 3, 5 with precision 1/2, 2/3, 3/5; mean = (0.5 + 0.6667 + 0.6) / 3
    assert m["auprc"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)  # 0.5889


def test_all_negative_labels():
    # labels [0, 0, 0], predicted (>= 0.5) [0, 1, 1]: tp 0, fp 2, tn 1, fn 0
    m = frame_metrics([0, 0, 0], [0.2, 0.6, 0.9], 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["positives"]) == (0, 2, 1, 0, 0)
    # precision 0/2 = 0; recall 0/0 and so F1 -> 0 by zero_division=0
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["specificity"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["auroc"] is None and m["auprc"] is None  # one class only


def test_no_predicted_positive():
    # predicted (>= 0.5): none. tp 0, fp 0, fn 2, tn 2
    m = frame_metrics([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 2, 2)
    # precision 0/0 -> 0 by zero_division=0; recall 0/2 = 0; F1 0
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert (m["accuracy"], m["specificity"]) == (0.5, 1.0)
    # AUROC pairs (pos, neg): 0.1 beats neither of 0.2, 0.4; 0.3 beats 0.2 -> 1 of 4
    assert m["auroc"] == pytest.approx(0.25)


def test_all_positive_labels_have_no_auroc_and_zero_specificity():
    m = frame_metrics([True, True], [0.3, 0.8], 0.5)
    assert m["auroc"] is None and m["auprc"] is None
    assert m["specificity"] == 0.0  # no negative label: 0/0 -> 0
    assert m["recall"] == 0.5 and m["precision"] == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        frame_metrics([], [], 0.5)
    with pytest.raises(ValueError):
        frame_metrics([0, 2], [0.1, 0.2], 0.5)  # mask labels are not binary labels
    with pytest.raises(ValueError):
        frame_metrics([0, 1], [0.1], 0.5)
    with pytest.raises(ValueError):
        frame_metrics([0, 1], [0.1, np.nan], 0.5)


def test_best_f1_threshold_on_the_hand_case_and_reproducible():
    # F1 = 2tp / (2tp + fp + fn) at each score used as threshold (>=):
    # 0.95: tp0 -> 0 | 0.9: 2/5 = 0.4 | 0.7: 4/6 = 0.667 | 0.55: 4/7 = 0.571 | 0.4: tp3 fp2 -> 6/8 = 0.75
    # 0.3: 6/9 | 0.2: 6/10 | 0.1: 6/11  -> best 0.4 with 0.75
    threshold, f1 = best_f1_threshold(LABELS, SCORES)
    assert threshold == 0.4 and f1 == pytest.approx(0.75)
    assert frame_metrics(LABELS, SCORES, threshold)["f1"] == pytest.approx(f1)


def test_best_f1_threshold_tie_goes_to_the_highest_threshold():
    # labels [1, 0, 0, 1], scores [0.9, 0.8, 0.7, 0.6]
    # 0.9: tp1 fp0 fn1 -> 2/3 | 0.8: 2/4 | 0.7: 2/5 | 0.6: tp2 fp2 fn0 -> 4/6 = 2/3: tie -> 0.9
    threshold, f1 = best_f1_threshold([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6])
    assert threshold == 0.9 and f1 == pytest.approx(2 / 3)
    assert frame_metrics([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6], threshold)["f1"] == pytest.approx(f1)


def test_best_f1_threshold_reproduces_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.08
    scores = np.round(np.clip(0.3 * labels + rng.random(500) * 0.7, 0, 1), 2)  # many tied scores
    threshold, f1 = best_f1_threshold(labels, scores)
    assert frame_metrics(labels, scores, threshold)["f1"] == pytest.approx(f1, abs=1e-12)
    assert f1 >= max(frame_metrics(labels, scores, t)["f1"] for t in np.unique(scores)) - 1e-12


def test_best_f1_threshold_without_positives():
    assert best_f1_threshold([0, 0, 0], [0.1, 0.7, 0.3]) == (0.7, 0.0)


def test_area_threshold_sweep_on_a_hand_case():
    labels = [1, 0, 1, 0]
    fractions = [0.02, 0.004, 0.0035, 0.0]
    rows = area_threshold_sweep(labels, fractions, thresholds=(0.001, 0.004, 0.03))
    assert [r["threshold"] for r in rows] == [0.001, 0.004, 0.03]
    # 0.001: predicted [1, 1, 1, 0] -> tp2 fp1 fn0: P 2/3, R 1, F1 4/5
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"]) == (2, 1, 0)
    assert rows[0]["precision"] == pytest.approx(2 / 3) and rows[0]["recall"] == 1.0
    assert rows[0]["f1"] == pytest.approx(0.8)
    # 0.004: predicted [1, 1, 0, 0] (0.004 >= 0.004 counts) -> tp1 fp1 fn1: P 0.5, R 0.5, F1 0.5
    assert (rows[1]["tp"], rows[1]["fp"], rows[1]["fn"]) == (1, 1, 1)
    assert (rows[1]["precision"], rows[1]["recall"], rows[1]["f1"]) == (0.5, 0.5, 0.5)
    # 0.03: nothing predicted -> 0 by zero_division=0
    assert (rows[2]["tp"], rows[2]["precision"], rows[2]["recall"], rows[2]["f1"]) == (0, 0, 0, 0)


def test_default_area_thresholds_are_the_decimals_from_0_1_to_5_percent():
    assert len(AREA_THRESHOLDS) == 50
    assert list(AREA_THRESHOLDS[:3]) == [0.001, 0.002, 0.003]
    assert AREA_THRESHOLDS[9] == 0.01 and AREA_THRESHOLDS[-1] == 0.05
    assert len(area_threshold_sweep([1, 0], [0.01, 0.0])) == 50


def square(shape, rows, cols, value=1):
    mask = np.zeros(shape, np.uint8)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = value
    return mask


def test_dice_on_hand_masks():
    a = square((4, 4), (0, 2), (0, 2)).astype(bool)  # 4 pixels
    b = square((4, 4), (0, 2), (1, 3)).astype(bool)  # 4 pixels, 2 shared (column 1)
    assert dice(a, b) == 0.5                          # 2*2 / (4 + 4)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty: nothing to disagree on
    with pytest.raises(ValueError):
        dice(a, a[:3])


def test_frame_labels_per_frame_and_optimal_wins():
    masks = np.zeros((4, 3, 3), np.uint8)
    masks[1, 0, 0] = 1
    masks[2, 1, 1] = 2
    masks[3, 0, 0], masks[3, 2, 2] = 1, 2  # should not happen; optimal wins as in the challenge
    assert frame_annotation_labels(masks).tolist() == [0, 1, 2, 1]
    with pytest.raises(ValueError):
        frame_annotation_labels(np.full((1, 2, 2), 3, np.uint8))


def test_selection_score_every_branch():
    with_optimal = np.array([0, 2, 1, 0])
    suboptimal_only = np.array([0, 2, 2, 0])
    assert selection_score(2, with_optimal) == 1.0     # optimal frame
    assert selection_score(1, with_optimal) == 0.6     # suboptimal while an optimal one exists
    assert selection_score(1, suboptimal_only) == 1.0  # suboptimal is the best available
    assert selection_score(0, with_optimal) == 0.0     # frame without annotation
    assert selection_score(0, np.zeros(4)) == 0.0      # ... also when the case has none
    assert selection_score(None, np.zeros(4)) == 1.0   # nothing selected, nothing to select
    assert selection_score(None, with_optimal) == 0.0  # nothing selected, something to select
    assert selection_score(None, suboptimal_only) == 0.0
    with pytest.raises(ValueError):
        selection_score(-1, with_optimal)  # must not wrap around to the last frame


# Two sweeps of 10 frames, 4 x 4 pixels. Selected frame 8 (sweep 0). Annotated: frame 4 (sweep 0,
# distance 4; label 2 on rows 0-1, cols 0-1) and frame 11 (sweep 1, distance 3: nearer, but across the
# sweep boundary; its mask equals the prediction, so picking it would score 1.0).
PRED = square((4, 4), (0, 2), (1, 3)).astype(bool)
GT = np.zeros((20, 4, 4), np.uint8)
GT[4] = square((4, 4), (0, 2), (0, 2), value=2)
GT[11] = square((4, 4), (0, 2), (1, 3), value=1)


def test_nearest_dice_takes_the_nearest_annotated_frame_of_the_same_sweep():
    # frame 4, binarised (label 2 -> 1), against the prediction: 2 shared of 4 + 4 -> 0.5
    assert nearest_annotation_dice(8, PRED, GT, frames_per_sweep=10) == 0.5
    assert nearest_annotation_dice(8, PRED, GT, 10, window=4) == 0.5  # distance 4 is within 4
    assert nearest_annotation_dice(4, PRED, GT, 10) == 0.5            # the selected frame itself
    assert nearest_annotation_dice(12, PRED, GT, 10) == 1.0           # sweep 1: frame 11


def test_nearest_dice_beyond_the_window_is_zero():
    assert nearest_annotation_dice(8, PRED, GT, 10, window=3) == 0.0  # frame 4 at 4 > 3; 11 other sweep


def test_nearest_dice_tie_goes_to_the_earlier_frame():
    gt = np.zeros((10, 4, 4), np.uint8)
    gt[3] = square((4, 4), (0, 2), (1, 3))  # equals PRED: Dice 1
    gt[7] = square((4, 4), (2, 4), (2, 4))  # disjoint from PRED: Dice 0
    assert nearest_annotation_dice(5, PRED, gt, 10) == 1.0  # 3 and 7 both at distance 2


def test_nearest_dice_when_nothing_is_selected():
    assert nearest_annotation_dice(None, PRED, GT, 10) == 0.0
    assert nearest_annotation_dice(None, PRED, np.zeros_like(GT), 10) == 1.0


def test_relative_ac_error_every_branch():
    assert relative_ac_error(310.0, 300.0) == pytest.approx(10 / 300)  # 0.0333
    assert relative_ac_error(290.0, 300.0) == pytest.approx(10 / 300)
    assert relative_ac_error(None, 300.0) == 1.0
    assert relative_ac_error(310.0, None) is None
    assert relative_ac_error(None, None) is None
    with pytest.raises(ValueError):
        relative_ac_error(310.0, 0.0)


def test_case_metrics_and_aggregate_on_hand_cases():
    # case A: highest score at frame 4 (suboptimal; the case has an optimal frame 11) -> selection score 0.6;
    # Dice at frame 4 itself 0.5; NAE |310 - 300| / 300 = 0.0333
    scores = np.full(20, 0.1)
    scores[4] = 0.9
    a = case_metrics(scores, GT, PRED, 300.0, 310.0, 10, threshold=0.5)
    assert a["selected_frame"] == 4
    assert (a["selection_score"], a["nearest_dice"]) == (0.6, 0.5)
    assert a["relative_ac_error"] == pytest.approx(1 / 30)
    # case B: every score below 0.5 -> nothing selected in an annotated case: selection score 0, Dice 0,
    # and the AC it passed is ignored: NAE 1
    b = case_metrics(np.full(20, 0.2), GT, np.zeros((4, 4), bool), 300.0, 300.0, 10, threshold=0.5)
    assert b == {"selected_frame": None, "selection_score": 0.0, "nearest_dice": 0.0, "relative_ac_error": 1.0}
    # case C (CLS, no mask, no reference AC): selects the optimal frame 11 -> selection score 1; others None
    scores = np.zeros(20)
    scores[11] = 0.7
    c = case_metrics(scores, GT, None, None, None, 10, threshold=0.5)
    assert c == {"selected_frame": 11, "selection_score": 1.0, "nearest_dice": None, "relative_ac_error": None}
    # means ignoring None: selection score (0.6 + 0 + 1) / 3 = 0.5333; Dice (0.5 + 0) / 2 = 0.25;
    # NAE (0.0333 + 1) / 2 = 0.5167
    summary = aggregate_case_metrics([a, b, c])
    assert summary["cases"] == 3
    assert summary["selection_score"] == pytest.approx(1.6 / 3)
    assert summary["nearest_dice"] == pytest.approx(0.25)
    assert summary["relative_ac_error"] == pytest.approx((1 / 30 + 1) / 2)
    assert aggregate_case_metrics([c])["relative_ac_error"] is None


def test_select_frame_takes_the_first_highest_score_at_or_above_the_threshold():
    assert select_frame_at_threshold([0.2, 0.8, 0.8, 0.1], 0.5) == 1  # tie: the first
    assert select_frame_at_threshold([0.2, 0.5, 0.3], 0.5) == 1       # >= like frame_metrics
    assert select_frame_at_threshold([0.2, 0.49, 0.3], 0.5) is None


def test_case_metrics_refuses_scores_of_another_length():
    with pytest.raises(ValueError):
        case_metrics(np.zeros(19), GT, None, None, None, 10, threshold=0.5)


def test_mean_std_table():
    runs = [{"accuracy": 0.95, "f1": 0.70, "precision": 0.8, "recall": 0.6},
            {"accuracy": 0.95, "f1": 0.72, "precision": 0.8, "recall": 0.7},
            {"accuracy": 0.95, "f1": 0.74, "precision": 0.8, "recall": 0.8}]
    table = mean_std_table(runs)
    # f1: mean 0.72; sample std sqrt((0.02^2 + 0 + 0.02^2) / (3 - 1)) = 0.02
    assert table["f1"] == pytest.approx((0.72, 0.02))
    assert table["recall"] == pytest.approx((0.7, 0.1))
    assert table["accuracy"] == pytest.approx((0.95, 0.0))
    assert mean_std_table(runs[:1], keys=("f1",)) == {"f1": (0.70, 0.0)}  # one run: std 0
    with pytest.raises(ValueError):
        mean_std_table([])


def test_format_paper_table():
    rows = {"FetalCLIP_CLS (LoRA)": {"accuracy": (0.9575, 0.0012), "f1": (0.757, 0.0123),
                                     "precision": (0.7782, 0.01), "recall": (0.73974, 0.02)},
            "FetalCLIP_SEG": {"f1": (0.771, 0.0), "precision": (0.699, 0.0), "recall": (0.86, 0.0)}}
    assert format_paper_table(rows) == (
        "| model | acc | F1 | precision | recall |\n"
        "|---|---|---|---|---|\n"
        "| FetalCLIP_CLS (LoRA) | 0.9575 ± 0.0012 | 0.7570 ± 0.0123 | 0.7782 ± 0.0100"
        " | 0.7397 ± 0.0200 |\n"
        "| FetalCLIP_SEG | - | 0.7710 ± 0.0000 | 0.6990 ± 0.0000 | 0.8600 ± 0.0000 |\n")
