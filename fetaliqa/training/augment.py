"""Train-time augmentation of model-resolution frames: colour jitter, CLAHE, affine (the paper's three).

Shapes: an image is ``(S, S)`` uint8 (a preprocessed frame, S = 224), a mask ``(S, S)`` uint8 in {0, 1}.
Every transform returns the dtype and shape it was given. The array transforms are deterministic given
their parameters; `augment_frame` draws the parameters once from a `numpy.random.Generator` and applies
the same geometry to the image (bilinear) and the mask (nearest), so the two stay aligned.
`augment_batch` is the Ray Data UDF over a batch of frames.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random draws. Brightness and contrast factors are drawn from [1 - x, 1 + x]; CLAHE is
    applied with probability `clahe_p`, its clip limit drawn from `clahe_clip` (albumentations' defaults);
    translation is up to `translate` of the side along each axis, rotation up to `rotate_deg` either way."""

    brightness: float = 0.2
    contrast: float = 0.2
    clahe_p: float = 0.5
    clahe_clip: tuple[float, float] = (1.0, 4.0)
    clahe_tiles: int = 8
    translate: float = 0.2
    rotate_deg: float = 20.0


def jitter(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """Scale intensities by `brightness`, then blend with the mean gray by `contrast` (torchvision's
    ColorJitter order and formulas). (S, S) uint8 -> (S, S) uint8, rounded and clipped to [0, 255]."""
    x = image.astype(np.float32) * brightness
    x = np.clip(x, 0, 255)
    x = (x - x.mean()) * contrast + x.mean()
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def clahe(image: np.ndarray, clip_limit: float, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) on a `tiles` x `tiles` grid.
    (S, S) uint8 -> (S, S) uint8."""
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(np.ascontiguousarray(image))


def affine_matrix(size: int, shift_xy: tuple[float, float], angle_deg: float) -> np.ndarray:
    """(2, 3) float64 matrix for cv2.warpAffine: rotate by `angle_deg` (counter-clockwise, about the image
    centre), then translate by `shift_xy` pixels (x right, y down)."""
    centre = ((size - 1) / 2, (size - 1) / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle_deg, 1.0)
    matrix[:, 2] += shift_xy
    return matrix


def warp(image: np.ndarray, matrix: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Apply a (2, 3) affine matrix; pixels from outside the frame are 0 (like the area outside the fan).
    (S, S) uint8 -> (S, S) uint8; bilinear for images, nearest for label masks (`nearest=True`)."""
    size = image.shape[::-1]
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpAffine(image, matrix, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def augment_frame(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
                  spec: AugmentSpec = AugmentSpec()) -> tuple[np.ndarray, np.ndarray | None]:  # noqa: B008
    """Jitter, maybe CLAHE, then one random affine applied to image and mask alike.

    image (S, S) uint8, mask (S, S) uint8 or None -> the same shapes and dtypes. Intensity first, so that
    CLAHE sees the frame, not the black borders the affine brings in.
    """
    b, c = rng.uniform(1 - spec.brightness, 1 + spec.brightness), rng.uniform(1 - spec.contrast, 1 + spec.contrast)
    out = jitter(image, b, c)
    if rng.random() < spec.clahe_p:
        out = clahe(out, rng.uniform(*spec.clahe_clip), spec.clahe_tiles)
    size = image.shape[0]
    shift = rng.uniform(-spec.translate, spec.translate, size=2) * size
    matrix = affine_matrix(size, (shift[0], shift[1]), rng.uniform(-spec.rotate_deg, spec.rotate_deg))
    return warp(out, matrix), (None if mask is None else warp(mask, matrix, nearest=True))


def augment_batch(batch: dict[str, np.ndarray], seed: int, spec: AugmentSpec = AugmentSpec()) -> dict[str, np.ndarray]:  # noqa: B008
    """Ray Data UDF: augment every frame of a batch; `image` (B, S, S) uint8 and, when present, `mask`
    (B, S, S) uint8 are replaced, the other columns pass through.

    The generator is seeded from `seed` and the (case_id, frame) keys of the batch, so a retried task
    produces the same frames; the upstream shuffle is reseeded every epoch, so each epoch's batches, and
    hence their draws, differ.
    """
    keys = "|".join(f"{c}:{f}" for c, f in zip(batch["case_id"], batch["frame"]))
    rng = np.random.default_rng([seed, zlib.crc32(keys.encode())])
    has_mask = "mask" in batch
    out = batch | {"image": np.empty_like(batch["image"])} | ({"mask": np.empty_like(batch["mask"])} if has_mask else {})
    for i in range(len(batch["image"])):
        image, mask = augment_frame(batch["image"][i], batch["mask"][i] if has_mask else None, rng, spec)
        out["image"][i] = image
        if has_mask:
            out["mask"][i] = mask
    return out
