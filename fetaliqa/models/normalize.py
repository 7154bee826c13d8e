"""Model input: resized uint8 frames to the normalised 3-channel float tensor the encoders take.

This is the torch half of preprocessing (`fetaliqa.preprocess` is the numpy half that read tasks run);
it runs where the model runs, on its device, so that only uint8 ``S x S`` frames travel between them.
`fold_normalization` moves it into a ViT's patch convolution instead, for scoring.
"""

from __future__ import annotations

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import VisionTransformer
from torch import nn

from fetaliqa.preprocess import IMAGE_SIZE, resize_frames


def normalize_frames(
    images: torch.Tensor, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD
) -> torch.Tensor:
    """Gray to 3 channels, scale to [0, 1], CLIP mean/std, on the device of `images`.

    Args:
        images: ``(N, S, S)`` uint8 tensor (a numpy array is accepted too), any device.
        mean, std: per-channel values (3 each): sequences, or (3,) tensors (a caller that normalises often
            keeps them on the device, `FrameModel`).
    Returns:
        ``(N, 3, S, S)`` float32 on the same device: ``(x / 255 - mean[c]) / std[c]``, computed in the
        same order as torchvision's ToTensor + Normalize.
    """
    if isinstance(images, np.ndarray):  # torch warns on read-only arrays (Ray's): copy those
        images = torch.from_numpy(np.require(images, requirements="W"))
    if images.ndim != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected (N, S, S) uint8 images, got {tuple(images.shape)} {images.dtype}")
    # Tensors already in float32 on the device are used as they are: no host-to-device copy per call.
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = images.unsqueeze(1).to(torch.float32).div_(255)
    return (x - mean_t).div_(std_t)


def fold_normalization(encoder: nn.Module, mean, std) -> bool:
    """Fold `normalize_frames` into an open_clip ViT's patch convolution, in place, so that the encoder takes
    ``(N, 1, S, S)`` raw gray values 0..255 (any float dtype) instead of ``(N, 3, S, S)`` normalised ones.

    ``conv1`` (``Conv2d(3, width, p, stride=p, padding=0)``) becomes ``Conv2d(1, width, p, stride=p)`` with
    weight ``sum_c W_c / (255 std_c)`` and bias ``-sum_c (mean_c / std_c) sum_ij W_c[:, :, i, j]``. Exact but
    for float rounding because the gray frame is the same in all 3 channels and, with no padding and stride
    equal to the kernel, every output position sees a whole kernel of input pixels. Returns whether it
    folded: False (nothing changed) for any other encoder or patch convolution. Computed in float64 and
    stored in ``conv1``'s dtype: fold before casting the model to a lower precision.
    """
    conv = getattr(encoder, "conv1", None) if isinstance(encoder, VisionTransformer) else None
    if not (isinstance(conv, nn.Conv2d) and conv.in_channels == 3 and conv.groups == 1
            and conv.padding == (0, 0) and conv.stride == conv.kernel_size and conv.dilation == (1, 1)):
        return False
    weight = conv.weight.detach().double()  # (width, 3, p, p)
    mean_t = torch.tensor(mean, dtype=torch.float64, device=weight.device)
    std_t = torch.tensor(std, dtype=torch.float64, device=weight.device)
    scale, shift = 1 / (255 * std_t), mean_t / std_t  # (3,) each: x_norm_c = scale_c * x - shift_c
    folded = nn.Conv2d(1, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=True,
                       device=weight.device, dtype=conv.weight.dtype)
    bias = -(weight.sum(dim=(2, 3)) * shift).sum(dim=1)
    if conv.bias is not None:
        bias += conv.bias.detach().double()
    with torch.no_grad():
        folded.weight.copy_((weight * scale.view(1, 3, 1, 1)).sum(dim=1, keepdim=True))
        folded.bias.copy_(bias)
    encoder.conv1 = folded
    return True


def preprocess_frames(frames: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """`resize_frames` then `normalize_frames`: ``(N, H, W)`` uint8 -> ``(N, 3, S, S)`` float32 on CPU."""
    return normalize_frames(torch.from_numpy(resize_frames(frames, size)))
