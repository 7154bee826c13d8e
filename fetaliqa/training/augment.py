"""Train-time augmentation: colour jitter, CLAHE, affine (the paper's three), in two recipes.

fetaliqa: every epoch, on model-resolution frames: an image is ``(S, S)`` uint8 (a preprocessed frame,
S = 224), a mask ``(S, S)`` uint8 in {0, 1}. `augment_frame` draws the parameters once from a
`numpy.random.Generator` and applies the same geometry to the image (bilinear) and the mask (nearest), so
the two stay aligned; `augment_batch` is the Ray Data UDF over a batch of frames.

paper (its preprocess.py, done once): the native frame and its label mask are padded to a square
``(L, L)`` (L = max(H, W)); copy 0 is kept as it is, copy 1 is augmented at that size (`paper_augment`:
ColorJitter(0.2, 0.2) with p 0.5 in random order, CLAHE with p 0.5, then always an affine with linear
image and nearest mask interpolation, constant 0 border); each copy is then resized to 224 (`paper_resize`:
cv2 INTER_CUBIC for images, INTER_NEAREST for masks) and labelled from its own resized mask.
Every transform returns the dtype it was given. The array transforms are deterministic given their
parameters.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from fetaliqa.preprocess import resize_frames_cv2_cubic, square_padding


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


def random_affine(size: int, rng: np.random.Generator, spec: AugmentSpec) -> np.ndarray:
    """The (2, 3) matrix of one random affine of a (size, size) frame: a shift up to `spec.translate` of the
    side along x and along y (drawn apart, in that order), then a rotation up to `spec.rotate_deg`."""
    shift = rng.uniform(-spec.translate, spec.translate, size=2) * size
    return affine_matrix(size, (shift[0], shift[1]), rng.uniform(-spec.rotate_deg, spec.rotate_deg))


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
    matrix = random_affine(image.shape[0], rng, spec)
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


PAPER_JITTER_P = 0.5  # the paper's ColorJitter(0.2, 0.2, p=0.5); fetaliqa jitters every frame
PAPER_SIZE = 224


def pad_to_square(frame: np.ndarray) -> np.ndarray:
    """(H, W) -> (L, L), L = max(H, W), zeros around, centred as `preprocess.square_padding` (the extra
    row or column of an odd difference at the bottom or right, as the paper's pad_to_square)."""
    side, top, left = square_padding(*frame.shape)
    out = np.zeros((side, side), frame.dtype)
    out[top:top + frame.shape[0], left:left + frame.shape[1]] = frame
    return out


def paper_resize(image: np.ndarray, mask: np.ndarray, size: int = PAPER_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(L, L) uint8 image and mask -> (size, size) uint8 each: cv2 INTER_CUBIC for the image, INTER_NEAREST
    for the mask (albumentations' Resize(interpolation=cv2.INTER_CUBIC, mask_interpolation=0))."""
    return (resize_frames_cv2_cubic(image[None], size)[0],
            cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST))


def paper_augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                  spec: AugmentSpec = AugmentSpec()) -> tuple[np.ndarray, np.ndarray]:  # noqa: B008
    """The paper's train_aug on a padded (L, L) uint8 image and its (L, L) uint8 label mask, same shapes out.

    Brightness and contrast (each factor from [0.8, 1.2]) in a random order with probability
    `PAPER_JITTER_P` (albumentations' ColorJitter shuffles its steps), CLAHE with `spec.clahe_p`, then an
    affine for image and mask alike: translation up to `spec.translate` of the side along x and along y
    (drawn apart), rotation up to `spec.rotate_deg`, about the centre; the mask's values are kept (nearest).
    """
    out = image
    if rng.random() < PAPER_JITTER_P:
        b, c = rng.uniform(1 - spec.brightness, 1 + spec.brightness), rng.uniform(1 - spec.contrast, 1 + spec.contrast)
        steps = [(b, 1.0), (1.0, c)]
        for brightness, contrast in (steps if rng.random() < 0.5 else steps[::-1]):
            out = jitter(out, brightness, contrast)
    if rng.random() < spec.clahe_p:
        out = clahe(out, rng.uniform(*spec.clahe_clip), spec.clahe_tiles)
    matrix = random_affine(image.shape[0], rng, spec)
    return warp(out, matrix), warp(mask, matrix, nearest=True)


def paper_copies(frame: np.ndarray, mask: np.ndarray, copies: int, rng: np.random.Generator,
                 size: int = PAPER_SIZE) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The paper's preprocessing of one native frame (H, W) uint8 and its label mask (H, W) uint8 {0, 1, 2}:
    `copies` x (image (size, size) uint8, mask (size, size) uint8 {0, 1}, label 0/1). Copy 0 is the padded
    frame resized; copies 1.. are `paper_augment`ed before the resize (copies = 2 for train, 1 otherwise).
    Each label is its own resized mask's: any pixel > 0."""
    padded, padded_mask = pad_to_square(frame), (pad_to_square(mask) > 0).astype(np.uint8)
    out = []
    for copy in range(copies):
        image, label_mask = (padded, padded_mask) if copy == 0 else paper_augment(padded, padded_mask, rng)
        image, label_mask = paper_resize(image, label_mask, size)
        out.append((image, label_mask, int(label_mask.any())))
    return out
