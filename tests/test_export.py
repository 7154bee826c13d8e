"""`fetaliqa export` and `evaluate --predictions`: a run written in the challenge's format and read back to
the same numbers; any algorithm's files scored by hand-worked rules; missing or malformed files named."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import own_stderr_lines
from test_evaluate import GT, PRED_MASKS, H, T, W, hand_archive, write_run  # noqa: F401 (hand_archive: a fixture)

from fetaliqa import cli
from fetaliqa.errors import NotAnImageError
from fetaliqa.evaluation import acouslic
from fetaliqa.evaluation.challenge_format import FRAME_NUMBER, SEGMENTATION, PredictionError, read_prediction
from fetaliqa.inputs.stacks import HEADER_BYTES, read_image_geometry
from jobs import evaluate as evaluate_job
from jobs import export as export_job


def read_stack(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def write_prediction(root, case_id: str, frame, stack: np.ndarray) -> None:
    """A challenge-format prediction written by hand, as another algorithm would."""
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(stack), str(folder / SEGMENTATION), True)
    (folder / FRAME_NUMBER).write_text(json.dumps(frame))


def metrics_of(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_a_seg_run_exported_then_evaluated_gives_the_runs_challenge_metrics(hand_archive, tmp_path, capsys):
    scores, preds = str(tmp_path / "scores"), tmp_path / "predictions"
    write_run(scores, hand_archive)
    assert cli.main(["export", "--scores", scores, "--output", str(preds)]) == 0
    assert "3 SEG cases, 1 with a selected frame" in capsys.readouterr().out

    # alpha selects frame 4 (its top score, positive): its 25 px mask in an otherwise empty 12 x 20 x 30 stack
    alpha = read_stack(preds / "alpha" / SEGMENTATION)
    assert alpha.shape == (T, H, W) and alpha.dtype == np.uint8
    assert np.array_equal(alpha[4], PRED_MASKS[("alpha", 4)]) and not np.delete(alpha, 4, axis=0).any()
    assert json.loads((preds / "alpha" / FRAME_NUMBER).read_text()) == 4
    # beta abstains: -1 and an empty stack; epsilon (scored; no mask in the archive) is written, gamma (failed) not
    assert json.loads((preds / "beta" / FRAME_NUMBER).read_text()) == -1
    assert not read_stack(preds / "beta" / SEGMENTATION).any()
    assert sorted(p.name for p in preds.iterdir()) == ["alpha", "beta", "epsilon"]

    assert evaluate_job.main(["--scores", scores, "--data", str(hand_archive), "--output", str(tmp_path / "a")]) == 0
    assert evaluate_job.main(["--predictions", str(preds), "--data", str(hand_archive),
                              "--output", str(tmp_path / "b")]) == 0
    from_scores, from_predictions = metrics_of(tmp_path / "a"), metrics_of(tmp_path / "b")
    assert from_predictions["acouslic"] == from_scores["acouslic"]
    assert [c["case_id"] for c in from_predictions["acouslic"]["per_case"]] == ["alpha", "beta"]
    assert from_scores["acouslic"]["per_case"][0]["frame"] == 4  # the comparison is not of two empty results
    assert {e["case_id"]: e["reason"] for e in from_predictions["excluded_cases"]} == {
        "gamma": "not_predicted", "delta": "not_predicted", "epsilon": "no_mask"}
    assert set(from_predictions) == {"run", "acouslic", "excluded_cases", "plots"}
    page = (tmp_path / "b" / "report.html").read_text()
    assert "ACOUSLIC-AI challenge metrics" in page and "derived from each case&#x27;s frames" in page
    assert "not_predicted" in page


def test_a_cls_run_exports_its_frame_numbers_with_empty_masks_through_fsspec(hand_archive, tmp_path):
    scores, preds = f"memory://{tmp_path.name}/scores", f"memory://{tmp_path.name}/predictions"
    write_run(scores, hand_archive, seg=False)
    assert export_job.main(["--scores", scores, "--output", preds]) == 0
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat(f"/{tmp_path.name}/predictions/alpha/{FRAME_NUMBER}")) == 4
    local = tmp_path / "alpha.mha"
    local.write_bytes(fs.cat(f"/{tmp_path.name}/predictions/alpha/{SEGMENTATION}"))
    assert read_stack(local).shape == (T, H, W) and not read_stack(local).any()

    out = f"memory://{tmp_path.name}/report"
    assert evaluate_job.main(["--predictions", preds, "--data", str(hand_archive), "--output", out]) == 0
    alpha = json.loads(fs.cat(f"/{tmp_path.name}/report/metrics.json"))["acouslic"]["per_case"][0]
    # frame 4 (suboptimal; the case has an optimal frame) with no mask: Dice 0 against its annotation, no AC
    assert alpha == {"case_id": "alpha", "frame": 4, "wfss": 0.6, "soft_dice": 0.0, "nae_ac": 1.0, "ac_mm": None,
                     "reference_ac_mm": 200.0}
    fs.rm(f"/{tmp_path.name}", recursive=True)


def test_any_algorithms_predictions_are_scored_by_the_challenges_rules(hand_archive, tmp_path, capsys):
    preds, out = tmp_path / "predictions", tmp_path / "report"
    # alpha selects its optimal frame 5 with the exact annotation; the other frames hold ones, to be ignored
    stack = np.ones((T, H, W), np.uint8)
    stack[5] = GT["alpha"][5] > 0
    write_prediction(preds, "alpha", 5, stack)
    # beta selects unannotated frame 0 (sweep 1: 250 mm) with the annotation of frame 1, the next frame
    stack = np.zeros((T, H, W), np.uint8)
    stack[0] = GT["beta"][1] > 0
    write_prediction(preds, "beta", 0, stack)
    assert evaluate_job.main(["--predictions", str(preds), "--data", str(hand_archive), "--output", str(out)]) == 0

    m = metrics_of(out)
    alpha, beta = m["acouslic"]["per_case"]
    ones = np.ones((H, W))
    ac_alpha = acouslic.circumference_mm(GT["alpha"][5] > 0, ones)
    ac_beta = acouslic.circumference_mm(GT["beta"][1] > 0, ones)
    assert 2 < ac_alpha < 12  # a 10 px square at 0.28 mm a pixel
    # beta's 4 x 4 px square (rows and columns 2-5) lies 2 px from the frame's edge, the whole-frame FOV's
    # outline: the challenge (ebf14b3) drops outline pixels within 3 px of it, leaving 3 ((4, 5), (5, 4),
    # (5, 5)), too few to fit an ellipse: no AC, NAE 1
    assert ac_beta is None
    assert alpha == {"case_id": "alpha", "frame": 5, "wfss": 1.0, "soft_dice": pytest.approx(1.0),
                     "nae_ac": pytest.approx((200 - ac_alpha) / 200), "ac_mm": pytest.approx(ac_alpha),
                     "reference_ac_mm": 200.0}
    # unannotated frame 0: the nearest annotated frame of the sweep is frame 1, Dice 1 weighted by 1 - 1/15
    assert beta == {"case_id": "beta", "frame": 0, "wfss": 0.0, "soft_dice": pytest.approx(14 / 15),
                    "nae_ac": 1.0, "ac_mm": None, "reference_ac_mm": 250.0}
    nae = (alpha["nae_ac"] + beta["nae_ac"]) / 2
    dice = (1 + 14 / 15) / 2
    assert m["acouslic"]["aggregate"] == {"wfss": 0.5, "soft_dice": pytest.approx(dice), "nae_ac": pytest.approx(nae),
                                          "score": pytest.approx(0.5 * (1 - nae) + 0.25 * dice + 0.25 * 0.5)}
    assert m["run"]["cases_evaluated"] == 2 and m["run"]["cases_excluded"] == 3
    assert f"ACOUSLIC-AI score {m['acouslic']['aggregate']['score']:.3f}" in capsys.readouterr().out


def test_missing_or_malformed_prediction_files_exclude_their_case_naming_the_file(hand_archive, tmp_path):
    preds, out = tmp_path / "predictions", tmp_path / "report"
    empty = np.zeros((T, H, W), np.uint8)
    write_prediction(preds, "alpha", 4.5, empty)  # not an integer
    write_prediction(preds, "beta", 0, empty)
    (preds / "beta" / SEGMENTATION).unlink()  # missing
    not_binary = empty.copy()
    not_binary[3, 0, 0] = 255
    write_prediction(preds, "gamma", 3, not_binary)
    write_prediction(preds, "delta", -1, empty)  # fine: delta is evaluated
    write_prediction(preds, "zeta", 0, empty)  # no such case
    assert evaluate_job.main(["--predictions", str(preds), "--data", str(hand_archive), "--output", str(out)]) == 0

    m = metrics_of(out)
    assert [c["case_id"] for c in m["acouslic"]["per_case"]] == ["delta"]
    excluded = {e["case_id"]: e for e in m["excluded_cases"]}
    assert {k: e["reason"] for k, e in excluded.items()} == {
        "alpha": "prediction_error", "beta": "prediction_error", "gamma": "prediction_error", "epsilon": "not_predicted",
        "zeta": "not_in_archive"}
    assert excluded["alpha"]["message"] == f"{preds}/alpha/{FRAME_NUMBER}: holds 4.5, not an integer frame number"
    assert excluded["beta"]["message"] == f"{preds}/beta/{SEGMENTATION}: no such file or object"
    assert excluded["gamma"]["message"].startswith(f"{preds}/gamma/{SEGMENTATION}: frame 3 holds values other than 0 "
                                                   "and 1 (max 255)")
    assert all("\n" not in e["message"] for e in m["excluded_cases"])


@pytest.mark.parametrize("frame, stack, problem", [
    (12, np.zeros((T, H, W), np.uint8), "frame 12 outside -1..11"),
    (True, np.zeros((T, H, W), np.uint8), "holds true, not an integer frame number"),
    (0, np.zeros((T, H, W + 1), np.uint8), f"stack of shape ({T}, {H}, {W + 1})"),
    (0, np.zeros((T // 2, H, W), np.uint8), f"stack of shape ({T // 2}, {H}, {W})"),
])
def test_read_prediction_refuses_a_bad_file_in_one_line_naming_it(tmp_path, frame, stack, problem):
    write_prediction(tmp_path, "case", frame, stack)
    with pytest.raises(PredictionError) as err:
        read_prediction(str(tmp_path), "case", (T, H, W))
    assert problem in str(err.value) and str(tmp_path / "case") in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_no_image_or_no_json_is_named(tmp_path):
    write_prediction(tmp_path, "case", 1, np.zeros((T, H, W), np.uint8))
    (tmp_path / "case" / SEGMENTATION).write_bytes(b"not an image at all")
    with pytest.raises(PredictionError, match=f"{tmp_path}/case/{SEGMENTATION}: not an image SimpleITK can read"):
        read_prediction(str(tmp_path), "case", (T, H, W))
    (tmp_path / "case" / FRAME_NUMBER).write_text("{frame: 1")
    with pytest.raises(PredictionError, match=f"{tmp_path}/case/{FRAME_NUMBER}: not JSON"):
        read_prediction(str(tmp_path), "case", (T, H, W))


def test_the_command_line_asks_for_one_source_and_an_output(hand_archive, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_job.main(["--scores", "a", "--predictions", "b", "--data", str(hand_archive)])
    assert "not allowed with argument" in own_stderr_lines(capsys)[-1]
    assert evaluate_job.main(["--predictions", str(tmp_path), "--data", str(hand_archive)]) == 2
    assert own_stderr_lines(capsys) == ["python -m jobs.evaluate: error: --output is required with --predictions"]
    missing = tmp_path / "nowhere"
    assert evaluate_job.main(["--predictions", str(missing), "--data", str(hand_archive), "--output",
                              str(tmp_path / "r")]) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and f"{missing}: no such file or object" in err[0]
    assert export_job.main(["--scores", str(missing), "--output", str(tmp_path / "p")]) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and "no scored case to export" in err[0]


def test_image_geometry_costs_one_ranged_get_not_the_image(s3_server, s3_bucket, tmp_path):
    """Export needs each case's (T, H, W) and spacing: the header, fetched by one ranged GET."""
    import s3fs

    bucket, options = s3_bucket
    stack = np.random.default_rng(0).integers(0, 255, (12, 300, 400), dtype=np.uint8)  # ~1.4 MB, incompressible
    image = sitk.GetImageFromArray(stack)
    image.SetSpacing((0.3, 0.25, 1.0))
    sitk.WriteImage(image, str(tmp_path / "case.mha"), True)
    s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True).put(str(tmp_path / "case.mha"),
                                                                           f"{bucket}/case.mha")
    before = len(s3_server.requests)

    shape, spacing = read_image_geometry(f"{bucket}/case.mha", {"client_kwargs": options})

    assert shape == (12, 300, 400) and spacing == pytest.approx((0.25, 0.3))
    requests = s3_server.requests[before:]
    assert [(r.method, r.range) for r in requests] == [("GET", f"bytes=0-{HEADER_BYTES - 1}")]
    with pytest.raises(NotAnImageError, match="not-an-image.mha: not an image"):
        (tmp_path / "not-an-image.mha").write_text("hello")
        read_image_geometry(str(tmp_path / "not-an-image.mha"))
