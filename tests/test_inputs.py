"""One lister and one reader for every command: train, score, evaluate and export on DICOM studies whose masks and
AC csv sit in the ACOUSLIC layout keyed by StudyInstanceUID (what `synth --format dicom` writes), and evaluate and
export on manifests and an S3 prefix of the same archive. Real DICOM, real SimpleITK, real local Ray, real moto S3."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from fetaliqa.errors import MaskMismatchError
from fetaliqa.evaluation.challenge_format import SEGMENTATION
from fetaliqa.inputs import layout
from fetaliqa.inputs.cases import case_geometry, read_case, read_case_frames
from fetaliqa.inputs.listing import archive_root, list_cases
from fetaliqa.inputs.stacks import read_circumferences
from fetaliqa.score.ledger import read_table
from fetaliqa.score.schema import CASES
from fetaliqa.synthetic.archive import SPACING_MM, write_synthetic_archive
from fetaliqa.synthetic.dicom import DICOM_DIR, write_synthetic_dicom_archive
from fetaliqa.training.protocol import load_split

from jobs import evaluate as evaluate_job
from jobs import export as export_job
from jobs import score as score_job
from jobs import train as train_job

K, H, W, CASES_N = 8, 70, 93, 10  # the train tests' sizes: 10 cases give every part of the split an AC sweep


@pytest.fixture(scope="module")
def dicom_archive(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("dicom-archive")
    studies = write_synthetic_dicom_archive(str(root), cases=CASES_N, frames_per_sweep=K, height=H, width=W, seed=3)
    return root, studies


@pytest.fixture(scope="module")
def pipeline(ray_local, dicom_archive, tmp_path_factory) -> dict:
    """train (one tiny epoch) -> score -> export on the DICOM archive, through the jobs; the outputs' paths."""
    root, _ = dicom_archive
    out = tmp_path_factory.mktemp("pipeline")
    model, scores, predictions = (str(out / name) for name in ("model", "scores", "predictions"))
    assert train_job.main(["--data", str(root), "--task", "cls", "--model", "fetalclip-tiny", "--output", model,
                           "--workers", "1", "--epochs", "1", "--batch-size", "8", "--full-finetune"]) == 0
    assert score_job.main(["--input", str(root), "--checkpoint", f"{model}/checkpoint", "--output", scores]) == 0
    assert export_job.main(["--scores", scores, "--output", predictions]) == 0
    return {"model": model, "scores": scores, "predictions": predictions, "out": out}


def _metrics(report: Path) -> dict:
    return json.loads((report / "metrics.json").read_text())


def test_a_dicom_archive_lists_its_studies_with_their_masks(dicom_archive):
    root, studies = dicom_archive
    cases = list_cases(str(root))
    assert [c.case_id for c in cases] == sorted(studies)
    for case in cases:
        assert len(case.instances) == layout.SWEEPS_PER_CASE and case.source == case.instances[0]
        assert all(uri.startswith(f"{root}/{DICOM_DIR}/") for uri in case.instances)
        assert case.mask_uri == f"{root}/{layout.MASKS_DIR}/{case.case_id}.mha"
    frames, mask = read_case(cases[0], with_mask=True)
    assert frames.frames.shape == mask.shape == (layout.SWEEPS_PER_CASE * K, H, W)  # the cropped region's geometry
    assert frames.spacing_mm == pytest.approx((SPACING_MM, SPACING_MM))
    # the header reader agrees with the pixel reader, without decoding a pixel
    assert case_geometry(cases[0]) == (frames.frames.shape, pytest.approx((SPACING_MM, SPACING_MM)))


def test_train_score_evaluate_and_export_run_on_dicom_studies(pipeline, dicom_archive, tmp_path):
    root, studies = dicom_archive
    split = load_split(pipeline["model"])
    assert sorted(split.part("train") + split.part("val") + split.part("test")) == sorted(studies)
    scored = read_table(pipeline["scores"], CASES)
    assert sorted(scored["case_id"].to_pylist()) == sorted(studies)

    assert evaluate_job.main(["--scores", pipeline["scores"], "--data", str(root), "--output", str(tmp_path / "s")]) == 0
    assert evaluate_job.main(["--predictions", pipeline["predictions"], "--data", str(root),
                              "--output", str(tmp_path / "p")]) == 0
    run, exported = _metrics(tmp_path / "s"), _metrics(tmp_path / "p")
    assert run["run"]["cases_evaluated"] == exported["run"]["cases_evaluated"] == len(studies)
    assert run["excluded_cases"] == exported["excluded_cases"] == []
    assert run["frame_metrics"]["n"] == len(studies) * layout.SWEEPS_PER_CASE * K
    assert exported["acouslic"] == run["acouslic"]
    # the exported stack has the study's frames in the cropped region's geometry
    study = sorted(studies)[0]
    exported_stack = sitk.ReadImage(str(Path(pipeline["predictions"]) / study / SEGMENTATION))
    assert exported_stack.GetSize()[::-1] == (layout.SWEEPS_PER_CASE * K, H, W)


def test_evaluate_and_export_read_manifests_and_an_s3_prefix(pipeline, dicom_archive, s3_bucket, tmp_path):
    root, studies = dicom_archive
    expected = _metrics_of(pipeline, root, tmp_path / "reference")

    # a Parquet manifest of the DICOM files, relative to its folder: the archive's root
    files = sorted(p.relative_to(root).as_posix() for p in (root / DICOM_DIR).iterdir())
    pq.write_table(pa.table({"uri": files}), root / "studies.parquet")
    assert archive_root(str(root / "studies.parquet")) == str(root)
    assert [c.case_id for c in list_cases(str(root / "studies.parquet"))] == sorted(studies)
    assert _metrics_of(pipeline, root / "studies.parquet", tmp_path / "parquet") == expected

    # an S3 prefix holding the whole archive
    bucket, options = s3_bucket
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True)
    fs.put(str(root), f"{bucket}/archive", recursive=True)
    so = {"client_kwargs": options}
    remote = list_cases(f"{bucket}/archive", so)
    assert [c.case_id for c in remote] == sorted(studies)
    assert remote[0].mask_uri == f"{bucket}/archive/{layout.MASKS_DIR}/{remote[0].case_id}.mha"
    assert _metrics_of(pipeline, f"{bucket}/archive", tmp_path / "s3", "--storage-options", json.dumps(so)) == expected


def _metrics_of(pipeline: dict, data, report: Path, *extra: str) -> tuple:
    """The challenge's metrics of the run (evaluate --scores) and of its export (evaluate --predictions) against
    `data`, with the cases each evaluated."""
    assert evaluate_job.main(["--scores", pipeline["scores"], "--data", str(data), "--output", str(report / "s"),
                              *extra]) == 0
    assert evaluate_job.main(["--predictions", pipeline["predictions"], "--data", str(data),
                              "--output", str(report / "p"), *extra]) == 0
    run, exported = _metrics(report / "s"), _metrics(report / "p")
    assert run["excluded_cases"] == exported["excluded_cases"] == []
    return run["acouslic"], exported["acouslic"], run["frame_metrics"]


def test_a_csv_manifest_of_stacked_images_finds_their_masks_and_ac_csv(tmp_path):
    ids = write_synthetic_archive(str(tmp_path), cases=2, frames_per_sweep=2, height=32, width=40, seed=1)
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["note", "uri"])
        rows.writerows([["", f"{layout.IMAGES_DIR}/{case_id}.mha"] for case_id in ids])
    cases = list_cases(str(tmp_path / "cases.csv"))
    assert [(c.case_id, c.instances, c.mask_uri) for c in cases] == [
        (case_id, None, f"{tmp_path}/{layout.MASKS_DIR}/{case_id}.mha") for case_id in sorted(ids)]
    frames, mask = read_case(cases[0], with_mask=True)
    assert frames.frames.shape == mask.shape == (layout.SWEEPS_PER_CASE * 2, 32, 40)
    assert sorted(read_circumferences(archive_root(str(tmp_path / "cases.csv")))) == sorted(ids)


def test_a_study_whose_mask_does_not_match_its_frames_is_one_line_naming_both(dicom_archive, tmp_path):
    source, _ = dicom_archive
    root = tmp_path / "archive"
    shutil.copytree(source, root)
    case = list_cases(str(root))[0]
    wrong = np.zeros((layout.SWEEPS_PER_CASE * K, H + 24, W + 18), np.uint8)  # the uncropped canvas's size
    sitk.WriteImage(sitk.GetImageFromArray(wrong), case.mask_uri)
    with pytest.raises(MaskMismatchError) as info:
        read_case(case, with_mask=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{case.mask_uri}: ")
    assert f"{len(wrong)} x {H + 24} x {W + 18}" in message and f"{len(wrong)} x {H} x {W}" in message
    assert case.source in message
    # the frames' reader alone is unaffected
    assert read_case_frames(case).frames.shape == (len(wrong), H, W)
