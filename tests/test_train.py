"""Training on a real local Ray: DDP that really synchronises, a killed worker that resumes from its
checkpoint, a rerun that does not start over, and a checkpoint the scoring job takes, on real archives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fetaliqa.evaluation.metrics import best_f1_threshold
from fetaliqa.inputs.listing import list_cases
from fetaliqa.inputs.stacks import read_circumferences
from fetaliqa.models import LoraSpec, build_model, load_checkpoint
from fetaliqa.models.normalize import normalize_frames
from fetaliqa.score.ledger import read_table
from fetaliqa.score.schema import FRAMES
from fetaliqa.training.data import case_items, read_frames
from fetaliqa.training.loop import KILL_ONCE_ENV, LoopConfig, train_loop_per_worker
from fetaliqa.training.protocol import load_split
from fetaliqa.training.step import cls_loss, run_epoch

from jobs import score as score_job
from jobs import train as train_job

MODEL = "fetalclip-tiny"


@pytest.fixture(scope="module")
def train_archive(tmp_path_factory) -> Path:
    """10 cases of 6 x 8 frames of 70 x 93 pixels: one or two sweeps with an AC each."""
    from fetaliqa.synthetic.archive import write_synthetic_archive

    root = tmp_path_factory.mktemp("train-archive")
    write_synthetic_archive(str(root), cases=10, frames_per_sweep=8, height=70, width=93, seed=3)
    return root


def train_flags(archive, output, task="cls", workers=2, epochs=2, *extra) -> list[str]:
    # --full-finetune: fetalclip-tiny has no pretrained weights, and LoRA on a random encoder is refused.
    return ["--data", str(archive), "--task", task, "--model", MODEL, "--output", str(output),
            "--workers", str(workers), "--epochs", str(epochs), "--batch-size", "8", "--full-finetune", *extra]


def ray_checkpoints(output: Path) -> dict[str, dict]:
    """{epoch folder: the metrics in its fetaliqa.json} of Ray Train's kept checkpoints."""
    return {p.parent.name: json.loads(p.read_text())["metrics"] for p in sorted((output / "ray").glob("epoch-*/fetaliqa.json"))}


def val_scores(archive: Path, output: Path, checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of the validation frames, computed here without Ray from the exported model."""
    split, cases = load_split(str(output)), list_cases(str(archive))
    model, meta = load_checkpoint(checkpoint)
    model.merge_adapters()
    labels, scores = [], []
    for item in case_items(cases, split, "val"):
        rows = read_frames({k: np.array([v], dtype=object) for k, v in item.items()}, with_masks=False)
        with torch.inference_mode():
            scores.append(model.frame_scores(model(normalize_frames(rows["image"]))).numpy())
        labels.append(rows["label"])
    return np.concatenate(labels), np.concatenate(scores)


def test_cls_run_survives_a_killed_worker_exports_its_best_epoch_and_is_not_retrained(
        ray_local, train_archive, tmp_path, monkeypatch):
    out, marker = tmp_path / "run", tmp_path / "killed"
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))  # rank 1 exits once, after epoch 1's checkpoint
    assert train_job.main(train_flags(train_archive, out)) == 0
    assert marker.exists()

    # Ray Train restarted the worker group from epoch 1's checkpoint: epoch 2 was trained from it.
    kept = ray_checkpoints(out)
    assert kept["epoch-002"]["resumed_from_epoch"] == 1
    for metrics in kept.values():
        checksums = metrics["replica_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1]

    # The protocol and the exported checkpoint.
    split = json.loads((out / "split.json").read_text())
    circumferences = read_circumferences(str(train_archive))
    assert [len(split[p]) for p in ("train", "val", "test")] == [7, 1, 2]
    assert all(circumferences[c][s - 1] is not None for c, sweeps in split["sweeps"].items() for s in sweeps)
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "checkpoint" / "fetaliqa.json").read_text())
    assert meta["threshold"] == metrics["threshold"]
    best_epoch = min(kept, key=lambda name: kept[name]["val_loss"])
    assert metrics["best_epoch"] == kept[best_epoch]["epoch"]
    labels, scores = val_scores(train_archive, out, str(out / "checkpoint"))
    threshold, f1 = best_f1_threshold(labels, scores)
    assert threshold == pytest.approx(metrics["threshold"], abs=1e-6) and f1 == pytest.approx(metrics["val_f1"])
    for name, at in (("default", 0.5), ("best_f1_val", metrics["threshold"])):
        test = metrics["test"][name]
        assert test["threshold"] == at and test["n"] == metrics["test_frames"]
        assert {"accuracy", "f1", "precision", "recall", "specificity", "auroc", "auprc", "confusion_matrix"} <= set(test)
    assert "| fetalclip-tiny CLS (full, fetaliqa recipe) |" in (out / "results.md").read_text()
    assert metrics["trainable_parameters"] == sum(p.numel() for p in build_model(MODEL, trainable="full")[0].parameters())

    # The scoring job takes the checkpoint as it is (here on the test cases, listed in a .txt).
    listing, scored = tmp_path / "test-cases.txt", tmp_path / "scores"
    listing.write_text("".join(f"{c.source}\n" for c in list_cases(str(train_archive)) if c.case_id in split["test"]))
    assert score_job.main(["--input", str(listing), "--checkpoint", str(out / "checkpoint"),
                           "--output", str(scored)]) == 0
    frames = read_table(str(scored), FRAMES)
    assert frames["positive"].to_pylist() == list(frames["score"].to_numpy() >= meta["threshold"])

    # Rerunning the finished command resumes the finished run: no epoch is trained again.
    before = {p: p.stat().st_mtime_ns for p in (out / "ray").rglob("*") if p.is_file() and "epoch-" in str(p)}
    monkeypatch.delenv(KILL_ONCE_ENV)
    assert train_job.main(train_flags(train_archive, out)) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "ray").rglob("*") if p.is_file() and "epoch-" in str(p)}
    assert after == before
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]


def test_seg_run_of_the_paper_recipe_from_and_to_object_storage(ray_local, s3_bucket):
    import s3fs

    from fetaliqa.synthetic.archive import write_synthetic_archive

    bucket, options = s3_bucket
    data, out = f"{bucket}/archive", f"{bucket}/run"
    write_synthetic_archive(data, cases=10, frames_per_sweep=8, height=70, width=93, seed=3, storage_options=options)
    flags = train_flags(data, out, "seg", 1, 1, "--recipe", "paper", "--storage-options", json.dumps(options))
    assert train_job.main(flags) == 0

    fs = s3fs.S3FileSystem(client_kwargs=options, skip_instance_cache=True)
    metrics = json.loads(fs.cat_file(f"{out}/metrics.json"))
    assert metrics["task"] == "seg" and metrics["recipe"] == "paper" and metrics["default_threshold"] == 0.01
    assert 0.0 <= metrics["test"]["mean_dice"] <= 1.0
    assert [row["threshold"] for row in metrics["test"]["area_threshold_sweep"]][:2] == [0.001, 0.002]
    model, meta = load_checkpoint(f"{out}/checkpoint", storage_options=options)
    assert model.task == "seg" and meta["threshold"] == metrics["threshold"]
    assert meta["decoder"] == "paper" and type(model.head).__name__ == "PaperUnetrDecoder"
    assert meta["preprocess"]["interpolation"] == "cv2-cubic"  # trained on cv2-resized frames: scored on them
    assert fs.exists(f"{out}/split.json") and fs.glob(f"{out}/ray/epoch-001/weights.safetensors")


# ------------------------------------------------------------------------------------------------- DDP

def fixed_frames(n: int = 8):
    import ray

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 224, 224), dtype=np.uint8)
    return ray.data.from_items([{"image": images[i], "label": np.uint8(i % 2)} for i in range(n)])


def fit_two_workers(storage: Path, frames, loop: LoopConfig):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"loop": loop},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           datasets={"train": frames, "val": frames},
                           run_config=RunConfig(name="ddp", storage_path=str(storage)))
    return trainer.fit()


def one_process(loop: LoopConfig, frames) -> tuple[dict[str, torch.Tensor], float]:
    """The reference: the loop's own `run_epoch` in this process, no Ray, no DDP, the whole batch per step."""
    model, preprocess = build_model(**loop.model)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=loop.lr)
    batch = {key: torch.as_tensor(np.stack(values)) for key, values in frames.to_pandas().to_dict("list").items()}
    for _ in range(loop.epochs):
        loss = run_epoch(model, cls_loss, [batch], preprocess, torch.device("cpu"), optimizer)
    return model.state_dict(), loss


def test_two_workers_take_the_same_steps_as_one_process_with_the_same_global_batch(ray_local, tmp_path):
    # 3 epochs of ONE global batch of 8 frames each (the whole fixed dataset), no augmentation, no dropout:
    # DDP averages the two workers' gradients of 4 frames each, so every step equals one step on all 8.
    loop = LoopConfig(model={"name": MODEL, "task": "cls", "lora": LoraSpec(dropout=0.0), "seed": 0},
                      epochs=3, batch_size=8)
    frames = fixed_frames()
    two = fit_two_workers(tmp_path, frames, loop)
    assert two.metrics["epoch"] == 3
    checksums = two.metrics["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # the replicas are in step, bit for bit

    reference, last_loss = one_process(loop, frames)
    assert two.metrics["train_loss"] == pytest.approx(last_loss, abs=1e-5)
    weights = load_file(str(Path(two.checkpoint.path) / "weights.safetensors"))
    trained = [k for k in weights if ".lora_" in k or k.startswith("head.")]
    assert trained and any(".lora_B" in k and weights[k].abs().max() > 0 for k in trained)  # it did learn
    for key in trained:
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=1e-5)
