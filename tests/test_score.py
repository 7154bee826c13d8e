"""The scoring job end to end: real Ray, real Parquet, real SimpleITK files, a real S3 endpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest
import SimpleITK as sitk
from conftest import REPO, assert_decisions_follow_the_frames, own_stderr_lines, run_cli

from fetaliqa.inputs.listing import list_cases
from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.models import load_checkpoint
from fetaliqa.score.ledger import read_table
from fetaliqa.score.predict import KILL_ONCE_ENV, ScoreFrames
from fetaliqa.score.read import read_case_row
from fetaliqa.score.schema import CASES, CASES_SCHEMA, ERRORS, FRAMES, FRAMES_SCHEMA
from fetaliqa.score.write import BEST_FRAME_MAX_BYTES

from jobs import score as score_job


def score(*flags: str) -> int:
    return score_job.main(list(flags))


def frames_of(archive: Path) -> dict[str, int]:
    return {c.case_id: read_image_stack(c.source).frames.shape[0] for c in list_cases(str(archive))}


def keyed_scores(output: str, storage_options=None) -> dict[tuple[str, int], float]:
    table = read_table(output, FRAMES, storage_options)
    keys = list(zip(table["case_id"].to_pylist(), table["frame"].to_pylist()))
    assert len(keys) == len(set(keys)), "a (case_id, frame) row appears twice"
    return dict(zip(keys, table["score"].to_pylist()))


def decoded(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)


def test_cls_run_writes_the_documented_schema_and_every_frame(small_archive, cls_checkpoint, cls_scores):
    out = cls_scores
    frames = read_table(out, FRAMES)
    cases = read_table(out, CASES)
    assert frames.schema.equals(FRAMES_SCHEMA) and cases.schema.equals(CASES_SCHEMA)
    expected = frames_of(small_archive)
    assert frames.num_rows == sum(expected.values())
    assert sorted(cases["case_id"].to_pylist()) == sorted(expected)
    assert read_table(out, ERRORS).num_rows == 0

    scores = frames["score"].to_numpy()
    assert np.all((scores >= 0) & (scores <= 1))
    _, meta = load_checkpoint(cls_checkpoint)
    assert frames["positive"].to_pylist() == list(scores >= meta["threshold"])
    assert set(frames["model"].to_pylist()) == {meta["checkpoint_id"]}
    assert frames["mask_area"].null_count == frames.num_rows and frames["mask_png"].null_count == frames.num_rows
    # sweep = frame // (T // 6) + 1, for T = 48 here
    assert frames["sweep"].to_pylist() == [f // 8 + 1 for f in frames["frame"].to_pylist()]
    assert cases["ac_mm"].null_count == cases.num_rows
    assert_decisions_follow_the_frames(cases, frames)
    for column in ("study_date", "institution", "station", "manufacturer", "device_model"):  # stacked images
        assert cases[column].null_count == cases.num_rows
    run = json.loads(Path(out, "run.json").read_text())
    assert run["pseudonymized"] is False and run["pseudonym_key_id"] is None


def test_scores_equal_the_predictor_applied_without_ray(small_archive, cls_checkpoint, cls_scores):
    out = cls_scores
    case = list_cases(str(small_archive))[0]
    row = read_case_row(case.case_id, case.source)
    direct = ScoreFrames(cls_checkpoint, batch_size=5)({key: np.array([value]) for key, value in row.items()})
    got = keyed_scores(out)
    np.testing.assert_allclose([got[(case.case_id, f)] for f in range(len(direct["scores"][0]))],
                               direct["scores"][0], rtol=0, atol=1e-5)

    cases = read_table(out, CASES).to_pylist()
    mine = next(c for c in cases if c["case_id"] == case.case_id)
    assert mine["best_frame"] == int(np.argmax(direct["scores"][0]))
    assert mine["best_score"] == pytest.approx(float(np.max(direct["scores"][0])), abs=1e-6)
    # The review image is the frame the model was given (224 x 224 gray), up to JPEG's error.
    image = decoded(mine["best_frame_image"])
    seen = row["images"][mine["best_frame"]].astype(int)
    assert image.shape == seen.shape == (224, 224) and len(mine["best_frame_image"]) <= BEST_FRAME_MAX_BYTES
    assert np.abs(image.astype(int) - seen).mean() < 2.0


def test_seg_masks_come_back_at_native_resolution(small_archive, seg_scores):
    out = seg_scores
    frames = read_table(out, FRAMES)
    assert frames.num_rows == sum(frames_of(small_archive).values())
    assert frames["mask_area"].null_count == 0
    positive = frames.filter(pc.field("positive"))
    assert positive["mask_png"].null_count == 0
    assert frames.filter(~pc.field("positive"))["mask_png"].null_count == frames.num_rows - positive.num_rows
    for png, area in zip(positive["mask_png"].to_pylist()[:5], positive["mask_area"].to_pylist()[:5]):
        mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (70, 93) and int((mask > 0).sum()) == area
    assert_decisions_follow_the_frames(read_table(out, CASES), frames)


def test_seg_review_image_outlines_the_predicted_mask(small_archive, seg_checkpoint, seg_scores):
    """The best frame's review image is the model's frame in BGR with the outline of the mask predicted on it (at
    224 x 224) drawn in yellow, and the frame itself elsewhere."""
    cases = {c["case_id"]: c for c in read_table(seg_scores, CASES).to_pylist()}
    outlined = 0
    for case in list_cases(str(small_archive)):
        row = read_case_row(case.case_id, case.source)
        direct = ScoreFrames(seg_checkpoint, batch_size=8)({key: np.array([value]) for key, value in row.items()})
        mine = cases[case.case_id]
        best = mine["best_frame"]
        mask = np.unpackbits(direct["masks"][0][best], count=224 * 224).reshape(224, 224)
        image = decoded(mine["best_frame_image"]).astype(int)
        assert image.shape == (224, 224, 3) and len(mine["best_frame_image"]) <= BEST_FRAME_MAX_BYTES
        yellowness = (image[..., 1] + image[..., 2]) / 2 - image[..., 0]  # (G + R) / 2 - B: 0 on gray
        # the mask's pixels next to its outside (the image's edge counts as outside, as for cv2.findContours)
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        boundary = mask.astype(bool) & ~inner.astype(bool)
        near = cv2.dilate(boundary.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # JPEG's colour bleed
        assert not (yellowness[~near] > 60).any(), "yellow away from the mask's outline"
        if boundary.any():  # JPEG keeps colour at half resolution: a 1-px line is paler, a scattered mask's more so
            assert (yellowness[boundary] > 20).mean() > 0.6, "the outline is missing along the mask's boundary"
        gray = row["images"][best].astype(int)
        assert np.abs(image[~near] - gray[~near][:, None]).mean() < 3.0
        outlined += bool(boundary.any())
    assert outlined, "no case's best frame had a mask: the test saw no outline"


def test_review_jpeg_stays_under_its_bound_on_acouslic_size_frames():
    """Speckle frames of ACOUSLIC's size (562 x 744) resized to 224 as the scorer does, gray and with an outline,
    fit in BEST_FRAME_MAX_BYTES at the chosen quality; pure noise fits too, at a lower one."""
    from fetaliqa.preprocess import resize_by
    from fetaliqa.score.write import _review_jpeg
    from fetaliqa.synthetic.archive import synthetic_cases

    case = next(synthetic_cases(1, 2, 562, 744, seed=4))
    frames = resize_by("bicubic")(case.image, 224)
    mask = np.zeros((224, 224), np.uint8)
    cv2.ellipse(mask, (112, 120), (60, 45), 20, 0, 360, 1, -1)
    noise = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    for frame in [*frames, noise]:
        for outline in (None, mask):
            jpeg = _review_jpeg(frame, outline)
            assert len(jpeg) <= BEST_FRAME_MAX_BYTES
            assert decoded(jpeg).shape == ((224, 224) if outline is None else (224, 224, 3))
    # the speckle frames keep the documented quality: close to the frame
    assert np.abs(decoded(_review_jpeg(frames[0], None)).astype(int) - frames[0]).mean() < 2.0
    empty = decoded(_review_jpeg(frames[0], np.zeros((224, 224), np.uint8))).astype(int)
    assert ((np.minimum(empty[..., 1], empty[..., 2]) - empty[..., 0]) <= 20).all()  # an empty mask: no outline


def test_object_storage_in_and_out(ray_local, small_archive, cls_checkpoint, s3_bucket, capsys):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True)
    fs.put(str(small_archive), f"{bucket}/archive", recursive=True)
    fs.put(cls_checkpoint, f"{bucket}/checkpoint", recursive=True)
    storage_options = '{"endpoint_url": "%s"}' % options["endpoint_url"]

    assert score("--input", f"{bucket}/archive", "--checkpoint", f"{bucket}/checkpoint",
                 "--output", f"{bucket}/scores", "--storage-options", storage_options) == 0

    s3_options = {"client_kwargs": options}
    frames = read_table(f"{bucket}/scores", FRAMES, s3_options)
    assert frames.num_rows == sum(frames_of(small_archive).values())
    assert read_table(f"{bucket}/scores", CASES, s3_options).num_rows == 4
    printed = capsys.readouterr().out
    assert "4 cases scored" in printed and "fetaliqa-test-secret" not in printed and "fetaliqa-test-key" not in printed


def _write(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=True)


def bad_archive(root: Path, good: Path) -> dict[str, str]:
    """Copy `good`'s images and add one bad file of each kind; returns {case_id: expected error kind}."""
    images = root / "images" / "stacked_fetal_ultrasound"
    images.mkdir(parents=True)
    for src in (good / "images" / "stacked_fetal_ultrasound").iterdir():
        (images / src.name).write_bytes(src.read_bytes())
    some = next(images.iterdir()).read_bytes()
    (images / "truncated.mha").write_bytes(some[: len(some) // 2])
    (images / "text.mha").write_text("this is not an image\n")
    (images / "empty.mha").write_bytes(b"")
    _write(images / "flat.mha", np.zeros((70, 93), np.uint8))
    _write(images / "hot.mha", np.full((12, 20, 30), 700.0, np.float32))
    _write(images / "odd.mha", np.zeros((13, 20, 30), np.uint8))
    return {"truncated": "truncated", "text": "not_an_image", "empty": "empty", "flat": "bad_shape",
            "hot": "bad_dtype", "odd": "bad_frame_count"}


def test_bad_inputs_are_recorded_and_every_good_case_is_scored(ray_local, small_archive, cls_checkpoint, tmp_path):
    expected = bad_archive(tmp_path / "archive", small_archive)
    listing = tmp_path / "cases.txt"
    uris = [c.source for c in list_cases(str(tmp_path / "archive"))] + [str(tmp_path / "nowhere" / "gone.mha")]
    listing.write_text("\n".join(uris) + "\n")
    expected["gone"] = "missing"
    out = str(tmp_path / "out")

    assert score("--input", str(listing), "--checkpoint", cls_checkpoint, "--output", out) == 0

    errors = read_table(out, ERRORS).to_pylist()
    assert {Path(e["source"]).name.split(".")[0]: e["error"] for e in errors} == expected
    for error in errors:
        assert "\n" not in error["message"] and Path(error["source"]).name in error["message"]
    cases = read_table(out, CASES)
    assert sorted(cases["case_id"].to_pylist()) == sorted(frames_of(small_archive))
    assert read_table(out, FRAMES).num_rows == sum(frames_of(small_archive).values())


@pytest.mark.parametrize("problem", ["missing", "corrupt", "other-model"])
def test_a_bad_checkpoint_stops_the_job_before_any_work(small_archive, cls_checkpoint, tmp_path, problem, capsys):
    checkpoint = tmp_path / "checkpoint"
    if problem != "missing":
        checkpoint.mkdir()
        for f in Path(cls_checkpoint).iterdir():
            (checkpoint / f.name).write_bytes(f.read_bytes())
    if problem == "corrupt":
        (checkpoint / "weights.safetensors").write_bytes(b"\x00" * 100)
    if problem == "other-model":
        meta = (checkpoint / "fetaliqa.json").read_text()
        (checkpoint / "fetaliqa.json").write_text(meta.replace('"fetalclip-tiny"', '"fetalclip"'))
    out = tmp_path / "out"
    # in this process (the command line's own entry point, without a fresh interpreter's ~10 s of imports)
    assert score("--input", str(small_archive), "--checkpoint", str(checkpoint), "--output", str(out)) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and "error" in err[0] and str(checkpoint) in err[0]
    assert not out.exists()


def test_a_killed_predictor_actor_is_replaced_and_the_output_is_complete(small_archive, cls_checkpoint, tmp_path):
    marker = tmp_path / "killed-once"
    out = tmp_path / "out"
    result = run_cli("jobs.score", "--input", str(small_archive), "--checkpoint", cls_checkpoint,
                     "--output", str(out), "--batch-size", "8", env={KILL_ONCE_ENV: str(marker)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists(), "the fault was never injected"
    assert len(keyed_scores(str(out))) == sum(frames_of(small_archive).values())
    assert read_table(str(out), ERRORS).num_rows == 0


def test_read_and_write_tasks_do_not_import_the_model_stack():
    """Every read and write task's worker imports these modules; torch, open_clip and peft would add
    ~6 s of CPU per worker, which on a small machine costs as much as decoding a dozen cases."""
    code = ("import sys, fetaliqa.score.read, fetaliqa.score.write, fetaliqa.score.ledger, fetaliqa.score.record; "
            "print(sorted(m for m in ('torch', 'open_clip', 'peft', 'timm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def test_a_rerun_retries_failed_cases_and_keeps_the_rest(ray_local, small_archive, cls_checkpoint, tmp_path):
    archive = tmp_path / "archive"
    expected = bad_archive(archive, small_archive)
    images = archive / "images" / "stacked_fetal_ultrasound"
    out = str(tmp_path / "out")
    assert score("--input", str(archive), "--checkpoint", cls_checkpoint, "--output", out) == 0
    first = {c: s for c, s in keyed_scores(out).items()}

    good = next(p for p in sorted((small_archive / "images" / "stacked_fetal_ultrasound").iterdir()))
    (images / "truncated.mha").write_bytes(good.read_bytes())  # the user copies the file again
    assert score("--input", str(archive), "--checkpoint", cls_checkpoint, "--output", out) == 0

    errors = read_table(out, ERRORS)
    assert sorted(errors["case_id"].to_pylist()) == sorted(set(expected) - {"truncated"})
    cases = read_table(out, CASES)
    assert sorted(cases["case_id"].to_pylist()) == sorted([*frames_of(small_archive), "truncated"])
    again = keyed_scores(out)
    assert {k: v for k, v in again.items() if k[0] != "truncated"} == first  # scored once, kept as they were
    run = json.loads(Path(out, "run.json").read_text())
    assert run["cases"]["skipped"] == len(frames_of(small_archive)) and run["cases"]["retried"] == len(expected)
    assert run["cases"]["scored"] == 1 and run["history"][0]["cases"]["failed"] == len(expected)


def test_another_checkpoint_into_the_same_output_is_refused_unless_overwrite(ray_local, small_archive, cls_checkpoint,
                                                                           seg_checkpoint, cls_scores, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(cls_scores, out)  # a finished CLS run
    capsys.readouterr()
    assert score("--input", str(small_archive), "--checkpoint", seg_checkpoint, "--output", out) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1
    line = err[0]
    cls_id, seg_id = load_checkpoint(cls_checkpoint)[1]["checkpoint_id"], load_checkpoint(seg_checkpoint)[1]["checkpoint_id"]
    assert cls_id in line and seg_id in line and "--overwrite" in line
    assert set(read_table(out, FRAMES)["model"].to_pylist()) == {cls_id}

    assert score("--input", str(small_archive), "--checkpoint", seg_checkpoint, "--output", out, "--overwrite") == 0
    frames = read_table(out, FRAMES)
    assert set(frames["model"].to_pylist()) == {seg_id} and frames.num_rows == sum(frames_of(small_archive).values())
    assert json.loads(Path(out, "run.json").read_text())["history"] == []
