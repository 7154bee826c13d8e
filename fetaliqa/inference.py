"""A checkpoint's model ready to score frames (the one forward path of scoring and of training's evaluation),
and the scoring job's predictor that holds it in a Ray actor."""

from __future__ import annotations

import os

import numpy as np
import torch

from fetaliqa.models import load_checkpoint
from fetaliqa.models.normalize import normalize_frames
from fetaliqa.storage import StorageOptions


class FrameModel:
    """Loads a checkpoint onto the best device and scores batches of preprocessed frames.

    Adapters are merged once: peft's attention LoRA otherwise merges and unmerges on every forward pass,
    which costs time and leaves rounding drift in the frozen weights. Frames are normalised with the
    checkpoint's own mean and std (CLIP's for FetalCLIP, ImageNet's for most timm baselines); on CUDA the
    forward pass runs under bf16 autocast.
    """

    def __init__(self, checkpoint: str, storage_options: StorageOptions = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_checkpoint(checkpoint, storage_options=storage_options, device=self.device)
        self.model.merge_adapters()
        self.task = self.meta["task"]
        self.mean, self.std = self.meta["preprocess"]["mean"], self.meta["preprocess"]["std"]

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """images (N, S, S) uint8 -> scores (N,) float32 in [0, 1] and, for SEG, masks (N, S, S) bool (p > 0.5)."""
        # Ray hands out read-only arrays, which torch.from_numpy warns about: copy those only.
        pixels = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            output = self.model(normalize_frames(pixels, self.mean, self.std))
        scores = self.model.frame_scores(output).float().cpu().numpy()
        masks = (output.float().squeeze(1) > 0).cpu().numpy() if self.task == "seg" else None  # logit > 0 <=> p > 0.5
        return scores, masks


# Fault injection for tests: when set to a path that does not exist yet, the predictor creates it and
# kills its own process in the middle of a batch, once, so a test can see Ray replace the actor.
KILL_ONCE_ENV = "FETALIQA_FAULT_KILL_PREDICTOR_ONCE"


class Predictor:
    """Holds the model (one per Ray actor) and scores the frames of each case in a batch.

    Input batch: the columns of `read_case_row`, one entry per case. Output: the same minus `images`,
    plus `scores` (T,) float32 in [0, 1] and, for SEG, `masks` (T, S, S) bool (p > 0.5).
    """

    def __init__(self, checkpoint: str, batch_size: int = 32, storage_options: StorageOptions = None):
        self.model = FrameModel(checkpoint, storage_options)
        self.task = self.model.task
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scored = [self._score_case(np.asarray(images)) for images in batch["images"]]
        out = {key: value for key, value in batch.items() if key != "images"}
        out["scores"] = _ragged([scores for scores, _ in scored])
        if self.task == "seg":
            out["masks"] = _ragged([masks for _, masks in scored])
        return out

    def _score_case(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """images (T, S, S) uint8 -> scores (T,) float32 and, for SEG, masks (T, S, S) bool."""
        scores, masks = [np.zeros(0, np.float32)], [np.zeros((0, *images.shape[1:]), bool)]
        for start in range(0, len(images), self.batch_size):
            _maybe_die_once()
            chunk_scores, chunk_masks = self.model(images[start:start + self.batch_size])
            scores.append(chunk_scores)
            if chunk_masks is not None:
                masks.append(chunk_masks)
        return np.concatenate(scores).astype(np.float32), (np.concatenate(masks) if self.task == "seg" else None)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of per-case arrays, so cases with different T share one column."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _maybe_die_once() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
