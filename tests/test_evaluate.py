"""The evaluation: a hand-made run whose metrics are worked out by hand, then a real scoring run end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pytest
import SimpleITK as sitk
from conftest import own_stderr_lines

from fetaliqa.evaluation import acouslic
from fetaliqa.evaluation.report import evaluate
from fetaliqa.inputs import layout
from fetaliqa.inputs.listing import list_cases
from fetaliqa.inputs.stacks import read_circumferences, read_image_stack
from fetaliqa.score import ledger, schema

from jobs import evaluate as evaluate_job
from jobs import export as export_job

T, H, W = 12, 20, 30  # 6 sweeps of 2 frames: sweep s (1-based) holds frames 2(s-1) and 2(s-1)+1


def rect(top: int, bottom: int, left: int, right: int, value: int = 1) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[top:bottom, left:right] = value
    return mask


# alpha: frame 4 suboptimal (50 px), frame 5 optimal (100 px), frame 8 suboptimal; AC of sweep 3 = 200 mm.
# beta:  frame 1 optimal; AC of sweep 1 = 250 mm.
GT = {"alpha": {4: rect(5, 10, 5, 15, 2), 5: rect(5, 15, 5, 15, 1), 8: rect(0, 4, 0, 4, 2)},
      "beta": {1: rect(2, 6, 2, 6, 1)},
      "gamma": {}, "delta": {}, "epsilon": {}}
CSV = {"alpha": ["", "", "200", "", "", ""], "beta": ["250", "", "", "", "", ""],
       "gamma": [""] * 6, "delta": [""] * 6, "epsilon": [""] * 6}
# scores: alpha flags 0 (wrong), 4 and 5 (right), misses 8; beta flags nothing and misses 1.
SCORES = {"alpha": {0: 0.6, 4: 0.9, 5: 0.7, 8: 0.2}, "beta": {1: 0.3}}
PRED_MASKS = {("alpha", 0): rect(0, 3, 0, 3), ("alpha", 4): rect(5, 10, 5, 10), ("alpha", 5): rect(5, 15, 5, 15)}
THRESHOLD = 0.5


def write_archive(root: Path) -> None:
    """gamma failed in scoring; delta was never scored; epsilon was scored but has no mask."""
    for folder in (layout.IMAGES_DIR, layout.MASKS_DIR):
        (root / folder).mkdir(parents=True)
    for case_id, annotated in GT.items():
        image = np.full((T, H, W), 40, np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(root / layout.IMAGES_DIR / f"{case_id}.mha"), True)
        if case_id != "epsilon":
            mask = np.zeros((T, H, W), np.uint8)
            for frame, m in annotated.items():
                mask[frame] = m
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(root / layout.MASKS_DIR / f"{case_id}.mha"), True)
    csv = root / layout.CIRCUMFERENCES_CSV
    csv.parent.mkdir(parents=True)
    csv.write_text(",".join(layout.CSV_COLUMNS) + "\n" +
                   "".join(f"{c},subject-{c}," + ",".join(ac) + "\n" for c, ac in CSV.items()))


def write_run(out: str, root: Path, seg: bool = True) -> None:
    """One committed part: frames/ and cases/ of alpha, beta and epsilon; errors/ of gamma."""
    frames, cases = [], []
    for case_id, ac in (("alpha", 180.0), ("beta", 240.0), ("epsilon", None)):
        score = np.full(T, 0.1, np.float32)
        for frame, value in SCORES.get(case_id, {}).items():
            score[frame] = value
        positive = score >= THRESHOLD
        png = [cv2.imencode(".png", PRED_MASKS[(case_id, f)] * 255)[1].tobytes() if seg and positive[f] else None
               for f in range(T)]
        area = [int((PRED_MASKS.get((case_id, f), np.zeros(1)) > 0).sum()) if seg else None for f in range(T)]
        frames.append(pa.table({"case_id": [case_id] * T, "sweep": np.arange(T, dtype=np.int8) // 2 + 1,
                                "frame": np.arange(T, dtype=np.int32), "sop_instance_uid": pa.nulls(T, pa.string()),
                                "instance_frame": pa.nulls(T, pa.int32()), "score": score, "positive": positive,
                                "mask_area": pa.array(area, pa.int32()), "mask_png": pa.array(png, pa.binary()),
                                "model": ["hand-made"] * T, "run_id": ["hand"] * T}, schema=schema.FRAMES_SCHEMA))
        best = int(np.argmax(score))
        cases.append(pa.table({"case_id": [case_id], "frames": [T], "positives": [int(positive.sum())],
                               "best_frame": [best], "best_sweep": [best // 2 + 1], "best_score": [float(score[best])],
                               "ac_mm": pa.array([ac if seg else None], pa.float32()), "sweeps": [6], "note": [None],
                               "source": [str(root / layout.IMAGES_DIR / f"{case_id}.mha")], "run_id": ["hand"],
                               "decision": ["usable" if positive.any() else "rescan"],
                               "usable_sweeps": [sorted({f // 2 + 1 for f in np.flatnonzero(positive)})],
                               "best_frame_image": [cv2.imencode(".jpg", np.zeros((224, 224), np.uint8))[1].tobytes()],
                               **{k: pa.nulls(1, pa.string()) for k in ("study_date", "institution", "station",
                                                                        "manufacturer", "device_model")}},
                              schema=schema.CASES_SCHEMA))
    error = pa.table({"case_id": ["gamma"], "source": [str(root / layout.IMAGES_DIR / "gamma.mha")],
                      "error": ["truncated"], "message": ["gamma.mha: truncated or corrupt image data"],
                      "run_id": ["hand"]}, schema=schema.ERRORS_SCHEMA)
    tables = {schema.FRAMES: pa.concat_tables(frames), schema.CASES: pa.concat_tables(cases), schema.ERRORS: error}
    ledger.write_part(out, "hand-000000", tables, ["alpha", "beta", "epsilon"], ["gamma"])


@pytest.fixture(scope="module")
def hand_archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hand-archive")
    write_archive(root)
    return root


def test_hand_made_seg_run_gives_the_hand_computed_metrics(hand_archive, tmp_path):
    scores = str(tmp_path / "scores")
    write_run(scores, hand_archive)
    m = evaluate(scores, str(hand_archive)).metrics

    # 24 frames of alpha and beta; truly positive: alpha 4, 5, 8 and beta 1; predicted: alpha 0, 4, 5
    frame = m["frame_metrics"]
    assert (frame["n"], frame["positives"], frame["predicted_positives"]) == (24, 4, 3)
    assert (frame["tp"], frame["fp"], frame["fn"], frame["tn"]) == (2, 1, 2, 19)
    assert frame["precision"] == pytest.approx(2 / 3) and frame["recall"] == pytest.approx(1 / 2)
    assert frame["f1"] == pytest.approx(4 / 7)  # 2 TP / (2 TP + FP + FN)
    # positives 0.9, 0.7, 0.3, 0.2 against negatives 0.6 and nineteen 0.1: 78 of 80 pairs ranked right
    assert frame["auroc"] == pytest.approx(78 / 80)
    # at score >= 0.2 every positive is found for one false positive: F1 = 8 / 9
    assert frame["best_f1"]["threshold"] == pytest.approx(0.2) and frame["best_f1"]["f1"] == pytest.approx(8 / 9)
    assert frame["threshold_between"] == [pytest.approx(0.3), pytest.approx(0.6)]

    sweeps = {s["sweep"]: s for s in m["per_sweep"]}
    assert [sweeps[s]["n"] for s in range(1, 7)] == [4] * 6
    assert (sweeps[1]["tp"], sweeps[1]["fp"], sweeps[1]["fn"]) == (0, 1, 1)  # alpha 0 flagged, beta 1 missed
    assert (sweeps[3]["tp"], sweeps[3]["fp"], sweeps[3]["fn"]) == (2, 0, 0)
    assert (sweeps[5]["tp"], sweeps[5]["fp"], sweeps[5]["fn"]) == (0, 0, 1)

    per_case = {c["case_id"]: c for c in m["case_metrics"]["per_case"]}
    alpha, beta = per_case["alpha"], per_case["beta"]
    # alpha selects frame 4 (score 0.9): suboptimal while frame 5 is optimal -> 0.6; its 25 px mask inside the
    # 50 px annotation of frame 4 -> Dice 2 * 25 / 75; AC 180 against sweep 3's 200 -> 0.1
    assert (alpha["selected_frame"], alpha["selected_sweep"], alpha["selected_label"]) == (4, 3, "suboptimal")
    assert alpha["selection_score"] == pytest.approx(0.6)
    assert alpha["nearest_dice"] == pytest.approx(2 / 3)
    assert alpha["relative_ac_error"] == pytest.approx(0.1) and alpha["reference_ac_mm"] == 200
    # beta abstains (its top score 0.3 is not positive) on an annotated case: WFSS 0, Dice 0, NAE 1
    # (its ac_mm 240 is ignored: nothing was selected to measure)
    assert beta["selected_frame"] is None and (beta["selection_score"], beta["nearest_dice"], beta["relative_ac_error"]) == (
        0.0, 0.0, 1.0)
    assert (beta["tp"], beta["fp"], beta["fn"]) == (0, 0, 1)
    aggregate = m["case_metrics"]["aggregate"]
    assert aggregate["cases"] == 2
    assert (aggregate["selection_score"], aggregate["nearest_dice"], aggregate["relative_ac_error"]) == pytest.approx((0.3, 1 / 3, 0.55))

    # every other case is listed with its reason
    assert {e["case_id"]: e["reason"] for e in m["excluded_cases"]} == {
        "gamma": "scoring_error", "delta": "not_scored", "epsilon": "no_mask"}
    assert m["run"] | {"evaluated_at": None} == m["run"] | {
        "task": "seg", "models": ["hand-made"], "cases_in_run": 3, "cases_evaluated": 2, "cases_excluded": 3,
        "evaluated_at": None}


def test_the_challenges_own_metrics_of_the_hand_made_seg_run(hand_archive, tmp_path):
    scores = str(tmp_path / "scores")
    write_run(scores, hand_archive)
    section = evaluate(scores, str(hand_archive)).metrics["acouslic"]
    assert list(section) == ["per_case", "aggregate", "fov"] and section["fov"] == "derived from each case's frames"
    alpha, beta = section["per_case"]
    assert list(alpha) == ["case_id", "frame", "wfss", "soft_dice", "nae_ac", "ac_mm", "reference_ac_mm"]
    # alpha: frame 4, suboptimal while frame 5 is optimal -> 0.6. Its frames are all 40, so the derived FOV is the
    # whole frame: the 25 px mask inside the 50 px annotation -> 2/3. AC: the challenge's fit of that 5 x 5 square.
    ac = acouslic.circumference_mm(PRED_MASKS[("alpha", 4)], np.ones((H, W)))
    assert 2 < ac < 8  # mm: a circle of ~4-5 px across at 0.28 mm a pixel
    assert alpha == {"case_id": "alpha", "frame": 4, "wfss": 0.6, "soft_dice": pytest.approx(2 / 3),
                     "nae_ac": pytest.approx((200 - ac) / 200), "ac_mm": pytest.approx(ac), "reference_ac_mm": 200.0}
    # beta abstains (-1) on an annotated case: WFSS 0; the challenge measures the empty mask against the stack's
    # last frame, unannotated: SimpleITK's Dice of two empty masks, inf, written null; no AC, no sweep: NAE 1
    assert acouslic.EMPTY_DICE == float("inf")
    assert beta == {"case_id": "beta", "frame": -1, "wfss": 0.0, "soft_dice": None, "nae_ac": 1.0, "ac_mm": None,
                    "reference_ac_mm": None}
    # the challenge's plain means carry the inf into the mean Dice and the score: null; the others are numbers
    assert section["aggregate"] == {"wfss": pytest.approx(0.3), "soft_dice": None,
                                     "nae_ac": pytest.approx((alpha["nae_ac"] + 1) / 2), "score": None}


def nearest_count(lo: int, hi: int, side: int = W, size: int = 224) -> int:
    """How many of `size` output rows (or columns) sample padded rows lo..hi-1 of a `side`-px square: output
    i samples floor((i + 0.5) * side / size), nearest-neighbour resizing (`preprocess.mask_to_model`)."""
    return sum(lo <= (2 * i + 1) * side // (2 * size) < hi for i in range(size))


def test_paper_comparable_frame_metrics_of_the_hand_made_seg_run(hand_archive, tmp_path):
    scores = str(tmp_path / "scores")
    write_run(scores, hand_archive)
    paper = evaluate(scores, str(hand_archive)).metrics["frame_metrics_paper"]
    # AC sweeps: alpha's sweep 3 (frames 4, 5), beta's sweep 1 (frames 0, 1); gamma-epsilon are not evaluated.
    # Truth at 224 x 224: alpha 4, alpha 5, beta 1 (beta 0 unannotated). SEG rule: score > 0.01, and every
    # hand-made score is >= 0.1, so all four are predicted: TP 3, FP 1 (beta 0).
    assert (paper["n"], paper["cases"], paper["positives"]) == (4, 2, 3)
    assert (paper["tp"], paper["fp"], paper["fn"], paper["tn"]) == (3, 1, 0, 0)
    assert paper["rule"] == "predicted mask > 1% of the 224 x 224 image"
    # Pixels at 224: frames 20 x 30 pad to 30 x 30 (5 rows on top), so image rows r..s are padded rows r+5..s+5.
    # Predicted masks exist for the run's positive frames only (alpha 4: rows 5-9, cols 5-9 inside its truth
    # rows 5-9, cols 5-14; alpha 5: rows 5-14, cols 5-14 equal to the truth); beta 1 (score 0.3) has no mask.
    tp = nearest_count(10, 15) * nearest_count(5, 10) + nearest_count(10, 20) * nearest_count(5, 15)
    fn = nearest_count(10, 15) * nearest_count(10, 15) + nearest_count(7, 11) * nearest_count(2, 6)
    assert paper["pixel_f_score"] == pytest.approx(2 * tp / (2 * tp + fn))


def test_paper_comparable_frame_metrics_of_a_cls_run_use_a_strict_half(hand_archive, tmp_path, monkeypatch):
    monkeypatch.setitem(SCORES["beta"], 0, 0.5)  # the run calls it positive (>= 0.5), the paper's rule not
    scores = str(tmp_path / "scores")
    write_run(scores, hand_archive, seg=False)
    m = evaluate(scores, str(hand_archive)).metrics
    paper = m["frame_metrics_paper"]
    # alpha 4 (0.9) and 5 (0.7) found, beta 1 (0.3) missed, beta 0 (0.5, unannotated) not flagged
    assert (paper["tp"], paper["fp"], paper["fn"], paper["tn"]) == (2, 0, 1, 1)
    assert paper["f1"] == pytest.approx(0.8) and paper["pixel_f_score"] is None and paper["rule"] == "score > 0.5"
    assert m["frame_metrics"]["fp"] == 2  # the all-frames table keeps the run's own decisions: alpha 0, beta 0


def test_without_the_csv_the_paper_table_is_null_and_says_why(hand_archive, tmp_path):
    archive = tmp_path / "archive"
    for folder in (layout.IMAGES_DIR, layout.MASKS_DIR):
        (archive / folder).mkdir(parents=True)
        for file in (hand_archive / folder).iterdir():
            (archive / folder / file.name).symlink_to(file)  # symlinked data is listed like files
    scores = str(tmp_path / "scores")
    write_run(scores, archive)
    m = evaluate(scores, str(archive)).metrics
    assert m["frame_metrics_paper"] is None
    assert any("paper-comparable frame metrics not computed" in note for note in m["run"]["notes"])
    assert m["frame_metrics"]["n"] == 24  # the all-frames table does not need the csv


def test_a_fov_mask_file_is_used_for_every_case_and_named(hand_archive, tmp_path, capsys):
    scores, out = str(tmp_path / "scores"), tmp_path / "report"
    write_run(scores, hand_archive)
    fov = np.zeros((H, W), np.float32)
    fov[:, :8] = 1  # a "fan" of columns 0-7, read from an object store
    sitk.WriteImage(sitk.GetImageFromArray(fov), str(tmp_path / "fov.mha"))
    fov_url = f"memory://{tmp_path.name}/fov_mask.mha"
    fsspec.filesystem("memory").pipe_file(f"/{tmp_path.name}/fov_mask.mha", (tmp_path / "fov.mha").read_bytes())
    assert evaluate_job.main(["--scores", scores, "--data", str(hand_archive), "--output", str(out),
                              "--fov-mask", fov_url]) == 0

    m = json.loads((out / "metrics.json").read_text())
    assert m["acouslic"]["fov"] == f"file {fov_url}"
    alpha = m["acouslic"]["per_case"][0]
    # inside columns 0-7 the annotation of frame 4 and the mask are the same 5 x 3 px: Dice 1 (2/3 without the FOV)
    assert alpha["soft_dice"] == pytest.approx(1.0)
    expected_ac = acouslic.circumference_mm(PRED_MASKS[("alpha", 4)], fov)
    assert alpha["ac_mm"] == (None if expected_ac is None else pytest.approx(expected_ac))
    assert m["case_metrics"]["per_case"][0]["nearest_dice"] == pytest.approx(2 / 3)  # fetaliqa's own: no FOV
    assert f"file {fov_url}" in (out / "report.html").read_text()
    assert "ACOUSLIC-AI score inf (WFSS 0.300, Dice inf, NAE AC" in capsys.readouterr().out

    # a FOV mask of the challenge's size (562 x 744) does not fit these 20 x 30 frames: one line naming it, no report
    acouslic_size = tmp_path / "fov_562x744.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((562, 744), np.float32)), str(acouslic_size))
    assert evaluate_job.main(["--scores", scores, "--data", str(hand_archive), "--output", str(tmp_path / "r2"),
                              "--fov-mask", str(acouslic_size)]) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and f"{acouslic_size}: FOV mask is (562, 744); case alpha's frames are (20, 30)" in err[0]
    assert not (tmp_path / "r2").exists()
    fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


def test_cls_run_has_no_dice_or_ac_and_the_report_goes_to_any_fsspec_url(hand_archive, tmp_path, capsys):
    scores = f"memory://{tmp_path.name}/scores"  # scores in and report out through fsspec
    write_run(scores, hand_archive, seg=False)
    assert evaluate_job.main(["--scores", scores, "--data", str(hand_archive)]) == 0

    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}/scores/evaluation"
    m = json.loads(fs.cat(f"{root}/metrics.json"))
    assert m["run"]["task"] == "cls" and m["frame_metrics"]["f1"] == pytest.approx(4 / 7)
    assert m["case_metrics"]["aggregate"] == {"cases": 2, "selection_score": pytest.approx(0.3),
                                              "nearest_dice": None, "relative_ac_error": None}
    # the challenge scores CLS too: alpha's frame 4 with an empty mask -> Dice 0 against its annotation, no AC
    assert m["acouslic"]["per_case"][0] == {"case_id": "alpha", "frame": 4, "wfss": 0.6, "soft_dice": 0.0,
                                            "nae_ac": 1.0, "ac_mm": None, "reference_ac_mm": 200.0}
    assert {"pr_curve.png", "traces_alpha.png", "traces_beta.png"} <= set(m["plots"])
    page = fs.cat(f"{root}/report.html").decode()
    assert "gamma" in page and "not_scored" in page and "soft Dice" not in page
    printed = capsys.readouterr().out
    assert "2 cases, 24 frames: F1 0.571 (precision 0.667, recall 0.500), selection score 0.300; 3 cases excluded" in printed
    assert f"memory://{tmp_path.name}/scores/evaluation/report.html" in printed
    fs.rm(f"/{tmp_path.name}", recursive=True)


def test_nothing_to_evaluate_is_a_one_line_error(hand_archive, tmp_path, capsys):
    scores = tmp_path / "scores"
    (scores / "cases").mkdir(parents=True)
    assert evaluate_job.main(["--scores", str(scores), "--data", str(hand_archive)]) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and "no scored case could be evaluated" in err[0] and "not_scored" in err[0]


def test_scoring_then_evaluating_a_synthetic_archive(small_archive, seg_scores, tmp_path):
    scores, report_dir = seg_scores, tmp_path / "report"
    assert evaluate_job.main(["--scores", scores, "--data", str(small_archive), "--output", str(report_dir)]) == 0

    m = json.loads((report_dir / "metrics.json").read_text())
    assert {"run", "frame_metrics", "per_sweep", "case_metrics", "excluded_cases", "plots"} <= set(m)
    archive_frames = sum(read_image_stack(c.source).frames.shape[0] for c in list_cases(str(small_archive)))
    assert m["frame_metrics"]["n"] == archive_frames == sum(s["n"] for s in m["per_sweep"])
    # the paper's table counts the frames of the sweeps the csv gives an AC
    acs = read_circumferences(str(small_archive))
    ac_sweep_frames = sum(read_image_stack(c.source).frames.shape[0] // 6 * sum(a is not None for a in acs[c.case_id])
                          for c in list_cases(str(small_archive)))
    assert 0 < m["frame_metrics_paper"]["n"] == ac_sweep_frames < archive_frames
    assert 0 <= m["frame_metrics_paper"]["pixel_f_score"] <= 1
    assert m["run"]["task"] == "seg" and m["case_metrics"]["aggregate"]["cases"] == 4 and not m["excluded_cases"]
    for key in ("f1", "precision", "recall", "auroc", "auprc", "best_f1", "tp", "fp", "tn", "fn"):
        assert key in m["frame_metrics"]
    for case in m["case_metrics"]["per_case"]:
        assert {"selection_score", "nearest_dice", "relative_ac_error", "selected_frame"} <= set(case)
        assert not {"wfss", "soft_dice", "nae_ac"} & set(case)  # the challenge's names are only in "acouslic"
    # the challenge's metrics of the same selections; exported and evaluated as predictions, the same numbers
    assert [c["frame"] for c in m["acouslic"]["per_case"]] == [
        -1 if c["selected_frame"] is None else c["selected_frame"] for c in m["case_metrics"]["per_case"]]
    predictions = tmp_path / "predictions"
    assert export_job.main(["--scores", scores, "--output", str(predictions)]) == 0
    assert evaluate_job.main(["--predictions", str(predictions), "--data", str(small_archive),
                              "--output", str(tmp_path / "from-predictions")]) == 0
    again = json.loads((tmp_path / "from-predictions" / "metrics.json").read_text())
    assert again["acouslic"] == m["acouslic"] and not again["excluded_cases"]

    page = (report_dir / "report.html").read_text()
    assert "Paper-comparable frame metrics" in page
    images = re.findall(r"<img src='([^']+)'", page)
    assert "pr_curve.png" in images and len(images) == 1 + 4
    for name in images:
        png = cv2.imread(str(report_dir / name))
        assert png is not None and png.shape[0] > 300 and png.shape[1] > 500, name
