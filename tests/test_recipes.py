"""`--recipe paper` and its components without Ray: the paper's frames read from a real archive, the refusal
of LoRA on a random encoder, the strict CLS rule, the pooled SEG F-score, results.md in the paper's form."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import own_stderr_lines

from fetaliqa.inputs.cases import read_case
from fetaliqa.inputs.listing import list_cases
from fetaliqa.inputs.stacks import read_circumferences
from fetaliqa.preprocess import resize_frames
from fetaliqa.score.read import read_case_row
from fetaliqa.training.augment import pad_to_square
from fetaliqa.training.data import case_items, read_paper_frames
from fetaliqa.training.holdout import evaluate
from fetaliqa.training.outputs import results_markdown
from fetaliqa.training.protocol import PAPER_SEED, make_split, selected_frames
from fetaliqa.training.recipes import RECIPES

from jobs import info as info_job
from jobs import train as train_job


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from fetaliqa.synthetic.archive import write_synthetic_archive

    root = tmp_path_factory.mktemp("paper-archive")
    write_synthetic_archive(str(root), cases=10, frames_per_sweep=4, height=36, width=48, seed=2)
    return str(root)


def one_case_row(archive: str, part: str):
    cases = list_cases(archive)
    split = make_split([c.case_id for c in cases], read_circumferences(archive), PAPER_SEED, recipe="paper")
    item = case_items(cases, split, part)[0]
    case = item["case"]
    return {k: np.array([v], dtype=object) for k, v in item.items()}, case, item


def test_paper_train_frames_come_twice_copy_0_plain_and_labels_from_each_copys_resized_mask(archive):
    batch, case, item = one_case_row(archive, "train")
    rows = read_paper_frames(batch, with_masks=True, copies=2, seed=PAPER_SEED)
    stack, masks = read_case(case, with_mask=True)
    frames = selected_frames(item["sweeps"], len(stack.frames))
    assert rows["frame"].tolist() == np.repeat(frames, 2).tolist() and rows["copy"].tolist() == [0, 1] * len(frames)
    assert rows["image"].shape == rows["mask"].shape == (2 * len(frames), 224, 224)
    for i, f in enumerate(np.repeat(frames, 2)):
        if rows["copy"][i] == 0:
            plain = cv2.resize(pad_to_square(stack.frames[f]), (224, 224), interpolation=cv2.INTER_CUBIC)
            mask = cv2.resize((pad_to_square(masks[f]) > 0).astype(np.uint8), (224, 224), interpolation=cv2.INTER_NEAREST)
            assert np.array_equal(rows["image"][i], plain) and np.array_equal(rows["mask"][i], mask)
        assert rows["label"][i] == int(rows["mask"][i].any())
    assert any(not np.array_equal(rows["image"][i], rows["image"][i - 1]) for i in range(1, len(frames) * 2, 2))
    again = read_paper_frames(batch, with_masks=False, copies=2, seed=PAPER_SEED)  # deterministic by seed
    assert np.array_equal(again["image"], rows["image"]) and np.array_equal(again["label"], rows["label"])
    other = read_paper_frames(batch, with_masks=False, copies=2, seed=1)
    assert np.array_equal(other["image"][0::2], rows["image"][0::2])  # plain copies do not depend on it
    assert not np.array_equal(other["image"][1::2], rows["image"][1::2])
    test_batch, _, _ = one_case_row(archive, "test")
    assert set(read_paper_frames(test_batch, with_masks=False, copies=1, seed=PAPER_SEED)["copy"]) == {0}


def test_scoring_a_paper_checkpoint_feeds_the_model_the_papers_test_images(archive):
    # what `jobs.score` reads for a checkpoint of `--recipe paper` (its preprocess names the recipe's resize)
    test_batch, case, item = one_case_row(archive, "test")
    paper = read_paper_frames(test_batch, with_masks=False, copies=1, seed=PAPER_SEED)
    scored = read_case_row(case.case_id, case.source, resize=RECIPES["paper"].resize)["images"][paper["frame"]]
    assert np.array_equal(scored, paper["image"])
    fetaliqa = read_case_row(case.case_id, case.source, resize=RECIPES["fetaliqa"].resize)["images"]
    assert np.array_equal(fetaliqa, resize_frames(read_case(case)[0].frames))


@pytest.mark.parametrize("flags, match", [
    ([], "LoRA on a randomly initialised encoder"),
    (["--linear-probe"], "a linear probe on a randomly initialised encoder"),
    (["--recipe", "paper"], "LoRA on a randomly initialised encoder"),
])
def test_lora_or_a_probe_on_a_random_encoder_is_refused_before_any_work(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "no-archive"), "--task", "cls", "--model", "fetalclip-tiny", "--output", str(out)]
    assert train_job.main(argv + flags) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and match in err[0] and "--weights" in err[0] and "--full-finetune" in err[0]
    assert not out.exists()  # no split written: nothing ran (the archive does not even exist)


def test_weights_must_pair_with_models(tmp_path, capsys):
    argv = ["--data", str(tmp_path), "--task", "cls", "--model", "fetalclip-tiny", "timm:densenet121",
            "--weights", "a.pt", "--output", str(tmp_path / "run")]
    assert train_job.main(argv) == 2
    err = own_stderr_lines(capsys)
    assert len(err) == 1 and "one per model" in err[0]


def test_info_reports_the_papers_lora_placement(capsys):
    assert info_job.main(["--model", "fetalclip-tiny", "--recipe", "paper"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert paper["config"]["lora"]["targets"] == ["c_fc", "c_proj", "out_proj"]
    # 4 blocks of width 128: c_fc, c_proj r (128 + 512) each, out_proj r (128 + 128); + Linear(128, 1)
    assert paper["trainable_parameters"] == 4 * 8 * (2 * 640 + 256) + 129
    assert info_job.main(["--model", "fetalclip-tiny", "--recipe", "paper", "--trainable", "full"]) == 0
    full = json.loads(capsys.readouterr().out)  # the paper's ablation modes combine with its LoRA placement
    assert full["config"]["trainable"] == "full" and full["trainable_parameters_by_mode"]["lora"] == paper["trainable_parameters"]


def test_strict_rule_at_the_default_threshold_and_pooled_pixel_f_score():
    labels = np.array([1, 0, 1, 0], np.uint8)
    val = {"label": labels, "score": np.array([0.9, 0.1, 0.8, 0.2], np.float32)}
    test = {"label": labels, "score": np.array([0.5, 0.1, 0.7, 0.5], np.float32)}
    paper, ours = evaluate("cls", val, test, strict=True), evaluate("cls", val, test)
    assert paper["test"]["default"]["tp"] == 1 and paper["test"]["default"]["fp"] == 0  # 0.5 is not > 0.5
    assert ours["test"]["default"]["tp"] == 2 and ours["test"]["default"]["fp"] == 1
    assert paper["default_rule"] == "score > 0.5" and ours["default_rule"] == "score >= 0.5"
    seg = {"label": labels, "score": np.array([0.05, 0.0, 0.02, 0.0]), "dice": np.array([0.5, 1.0, 0.9, 1.0]),
           "overlap_px": np.array([10, 0, 90, 0]), "predicted_px": np.array([30, 0, 100, 0]),
           "mask_px": np.array([10, 0, 100, 0])}
    assert evaluate("seg", seg, seg)["test"]["pixel_f_score"] == pytest.approx(2 * 100 / (130 + 110))


def test_results_md_has_one_row_per_model_with_mean_std_and_trainable_parameters():
    def trial(f1, trainable):
        at = {"accuracy": 0.9, "f1": f1, "precision": 0.8, "recall": 0.7}
        return {"test": {"default": at, "best_f1_val": at}, "trainable_parameters": trainable}

    text = results_markdown({"fetalclip CLS (lora, paper recipe)": [trial(0.7, 2_360_065), trial(0.8, 2_360_065)],
                             "timm:vgg16 CLS (full, paper recipe)": [trial(0.6, 134_264_641)] * 2})
    assert "| model | acc | F1 | precision | recall | trainable |" in text
    assert "| fetalclip CLS (lora, paper recipe) | 0.9000 ± 0.0000 | 0.7500 ± 0.0707 | 0.8000 ± 0.0000 | " \
           "0.7000 ± 0.0000 | 2,360,065 ± 0 |" in text
    assert "| timm:vgg16 CLS (full, paper recipe) | 0.9000 ± 0.0000 | 0.6000 ± 0.0000" in text
    assert text.count("mean ± std over 2 trials") == 2


def test_paper_frames_on_ray_data_are_made_once_and_only_reshuffled(ray_local, archive):
    from fetaliqa.training.data import frame_datasets, train_dataset

    cases = list_cases(archive)
    split = make_split([c.case_id for c in cases], read_circumferences(archive), PAPER_SEED, recipe="paper")
    frames = frame_datasets(cases, split, "cls", paper_copies_seed=PAPER_SEED)
    ac_frames = {part: sum(4 * len(split.sweeps[c]) for c in split.part(part)) for part in ("train", "val", "test")}
    assert frames["train"].count() == 2 * ac_frames["train"]
    assert frames["val"].count() == ac_frames["val"] and frames["test"].count() == ac_frames["test"]
    made = frames["train"].to_pandas()
    assert sorted(made["copy"].value_counts().tolist()) == [ac_frames["train"]] * 2
    # an epoch's train set: the same rows, reshuffled, not augmented again (the trial seed exceeds int64)
    epoch = train_dataset(frames["train"], PAPER_SEED + 1, augment=False).take_all()
    assert set(epoch[0]) == {"image", "label"} and len(epoch) == len(made)
    key = sorted(row["image"].tobytes() for row in epoch)
    assert key == sorted(image.tobytes() for image in made["image"])
