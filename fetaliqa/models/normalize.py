"""Model input: resized uint8 frames to the normalised 3-channel float tensor the encoders take.

This is the torch half of preprocessing (`fetaliqa.preprocess` is the numpy half that read tasks run);
it runs where the model runs, on its device, so that only uint8 ``S x S`` frames travel between them.
"""

from __future__ import annotations

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from fetaliqa.preprocess import IMAGE_SIZE, resize_frames


def normalize_frames(
    images: torch.Tensor, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD
) -> torch.Tensor:
    """Gray to 3 channels, scale to [0, 1], CLIP mean/std, on the device of `images`.

    Args:
        images: ``(N, S, S)`` uint8 tensor (a numpy array is accepted too), any device.
        mean, std: per-channel values (3 each).
    Returns:
        ``(N, 3, S, S)`` float32 on the same device: ``(x / 255 - mean[c]) / std[c]``, computed in the
        same order as torchvision's ToTensor + Normalize.
    """
    if isinstance(images, np.ndarray):  # torch warns on read-only arrays (Ray's): copy those
        images = torch.from_numpy(np.require(images, requirements="W"))
    if images.ndim != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected (N, S, S) uint8 images, got {tuple(images.shape)} {images.dtype}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = images.unsqueeze(1).to(torch.float32).div_(255)
    return (x - mean_t).div_(std_t)


def preprocess_frames(frames: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """`resize_frames` then `normalize_frames`: ``(N, H, W)`` uint8 -> ``(N, 3, S, S)`` float32 on CPU."""
    return normalize_frames(torch.from_numpy(resize_frames(frames, size)))
