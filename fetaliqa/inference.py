"""A checkpoint's model ready to score frames: the one forward path of scoring (`fetaliqa.score.predict`)
and of training's evaluation."""

from __future__ import annotations

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
