"""Score validation and test frames with a trained checkpoint, choose the threshold, compute the metrics.

`FrameScorer` is a Ray Data UDF (a plain class, usable on a dict without Ray) that holds the model of one
checkpoint; `evaluate` turns validation and test scores into the contents of `<output>/metrics.json`.
"""

from __future__ import annotations

import numpy as np
from ray.data import ActorPoolStrategy, Dataset
from ray.train import Checkpoint

from fetaliqa.evaluation.metrics import area_threshold_sweep, best_f1_threshold, dice, frame_metrics, pooled_f_score
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.models import DEFAULT_THRESHOLD
from fetaliqa.models.frame_model import FrameModel

SCORE_BATCH = 64  # frames per forward pass


class FrameScorer:
    """Holds a checkpoint's model (one per Ray actor) and scores batches of frames.

    Input batch: `case_id`, `frame`, `label` (B,), `image` (B, S, S) uint8 and, for SEG, `mask` (B, S, S)
    uint8. Output: `case_id`, `frame`, `label`, `score` (B,) float32 in [0, 1] (CLS: sigmoid; SEG: area
    fraction of p > 0.5) and, for SEG, `dice` (B,) float64 of the predicted mask against `mask` at model
    resolution (1.0 where both are empty, as `metrics.dice`) and its pixel counts `overlap_px`,
    `predicted_px`, `mask_px` (B,) int64, which pool into one F-score over many frames.
    """

    def __init__(self, checkpoint: Checkpoint, storage_options: StorageOptions = None):
        with checkpoint.as_directory() as folder:  # storage_options: for the base weights it may name
            self.model = FrameModel(folder, storage_options)  # the forward pass `fetaliqa score` runs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores, masks = self.model(batch["image"])
        out = {key: batch[key] for key in ("case_id", "frame", "label")} | {"score": scores}
        if masks is not None:
            truth = np.asarray(batch["mask"]).astype(bool)
            masks = np.asarray(masks).astype(bool)
            out["dice"] = np.array([dice(p, t) for p, t in zip(masks, truth)])
            out |= {"overlap_px": (masks & truth).sum(axis=(1, 2)), "predicted_px": masks.sum(axis=(1, 2)),
                    "mask_px": truth.sum(axis=(1, 2))}
        return out


def score_frames(frames: Dataset, checkpoint: Checkpoint, actors: int = 1, use_gpu: bool = False,
                 storage_options: StorageOptions = None) -> dict[str, np.ndarray]:
    """Score every frame of `frames` with `checkpoint`: the columns of `FrameScorer`'s output, as arrays.
    `use_gpu`: each actor reserves a GPU and scores on it; else on the CPU, even on a GPU node
    (`fetaliqa.models.frame_model.scoring_device`)."""
    scored = frames.map_batches(FrameScorer, fn_constructor_kwargs={"checkpoint": checkpoint,
                                                                   "storage_options": storage_options},
                                batch_size=SCORE_BATCH, compute=ActorPoolStrategy(min_size=1, max_size=actors),
                                num_gpus=1 if use_gpu else 0)
    table = scored.to_pandas()
    return {column: table[column].to_numpy() for column in table.columns}


def select_cases(scores: dict[str, np.ndarray], case_ids: list[str]) -> dict[str, np.ndarray]:
    """The rows of `score_frames` output that belong to `case_ids`."""
    keep = np.isin(scores["case_id"], case_ids)
    return {column: values[keep] for column, values in scores.items()}


def evaluate(task: str, val: dict[str, np.ndarray], test: dict[str, np.ndarray], strict: bool = False) -> dict:
    """metrics.json: the best-F1 validation threshold and the test metrics at it and at the default.

    val, test: `score_frames` outputs. Test metrics at each threshold: accuracy, F1, precision, recall,
    specificity, AUROC, AUPRC, tp/fp/tn/fn and the confusion matrix [[tn, fp], [fn, tp]]. `strict`: at the
    default threshold a frame is positive when its score is above it (the paper's code: p > 0.5), else at or
    above it; the validation threshold is always used with >=. SEG adds the mean Dice over all test frames
    and over the test frames with an abdomen, the pooled pixel F-score (one Dice over every test pixel: the
    paper's SEG Dice) and the area-threshold sweep.
    """
    threshold, val_f1 = best_f1_threshold(val["label"], val["score"])
    default = DEFAULT_THRESHOLD[task]
    test_metrics = {"default": _with_matrix(frame_metrics(test["label"], test["score"], default, strict)),
                    "best_f1_val": _with_matrix(frame_metrics(test["label"], test["score"], threshold))}
    out = {"task": task, "threshold": threshold, "default_threshold": default,
           "default_rule": f"score {'>' if strict else '>='} {default}", "val_f1": val_f1,
           "val_frames": len(val["label"]), "test_frames": len(test["label"]), "test": test_metrics}
    if task == "seg":
        positive = test["label"].astype(bool)
        overlap, predicted, truth = (int(test[k].sum()) for k in ("overlap_px", "predicted_px", "mask_px"))
        out["test"] |= {"mean_dice": float(np.mean(test["dice"])),
                        "mean_dice_positive": float(np.mean(test["dice"][positive])) if positive.any() else None,
                        "pixel_f_score": pooled_f_score(overlap, predicted, truth),
                        "area_threshold_sweep": area_threshold_sweep(test["label"], test["score"])}
    return out


def _with_matrix(metrics: dict) -> dict:
    return metrics | {"confusion_matrix": [[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]]}
