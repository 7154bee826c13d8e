"""Frames to model input, vectorised over a batch.

Shapes (channel-first, batch first): frames ``(N, H, W)`` uint8 at native resolution; resized images
``(N, S, S)`` uint8 with ``S = IMAGE_SIZE``; model input ``(N, 3, S, S)`` float32; masks ``(N, H, W)``
or ``(N, S, S)``.

The paper's preprocessing (FetalCLIP, as open_clip's eval transform on a zero-padded image): pad the
frame with zeros to a centred square of side ``max(H, W)`` (an odd difference puts the extra row or
column at the bottom or right, as the paper's ``make_image_square_with_zero_padding`` does with
``(side - h) // 2`` on top), resize to 224 with PIL's antialiased bicubic, gray to 3 channels, divide by
255, CLIP mean/std. It is split in two steps: `resize_frames` (here, numpy only) runs on CPU in the read
tasks and ships uint8 ``S x S`` images (12x smaller than float ``3 x S x S``);
`fetaliqa.models.normalize.normalize_frames` runs on the model's device. This module imports no torch,
open_clip or peft, so that a read task's worker starts in a fraction of a second instead of ~6 s.

How `resize_frames` is fast and still matches open_clip: PIL's resize is separable (a horizontal pass
rounded to 8 bits, then a vertical pass) and each output pixel is a weighted sum of a band of input
pixels with PIL's own bicubic weights (a = -0.5, support widened by the downscale factor, normalised
over the padded square). The zero padding contributes nothing to those sums, so the weights are built
once per geometry on the padded square, the padding's columns are dropped, and each pass is a few
small float32 matrix products (numpy, BLAS) over the image pixels only, in blocks of `_BLOCK` outputs whose bands
are contiguous, for `_CHUNK` frames at a time (cache-sized). Output pixels whose band lies in the
padding stay zero; nothing is padded, nothing outside the image is resampled.

Measured per 562 x 744 frame: 100 frames of speckle in the ACOUSLIC fan, one thread
(``torch.set_num_threads(1)``, ``cv2.setNumThreads(1)``), best of 3 runs on this shared 2-core machine
(absolute times moved by up to ~30% with other load; the ratios held). Difference to open_clip's
transform in gray levels over the 224 x 224 output (5.0M pixels):

==========================================================  ========  ===========================
option                                                      ms/frame  vs open_clip: mean / max
==========================================================  ========  ===========================
naive: np.pad + PIL bicubic, per frame (the reference)          1.87  0 / 0
PIL bicubic on the image plus a thin zero margin (``box=``)     1.44  0.0001 / 1
PIL bicubic of the bare image to its rounded footprint          1.37  2.26 / 95
cv2 INTER_AREA of the bare image to its rounded footprint       0.67  2.99 / 89
cv2 INTER_AREA of the padded square                             0.93  1.56 / 22
torch bicubic, antialias=True, on the padded batch (float)      2.47  0.068 / 6
banded float32 matmuls, image pixels only (`resize_frames`)     0.51  0.00003 / 1 (157 pixels)
==========================================================  ========  ===========================

Where the time goes (120 frames, one thread): the horizontal pass 0.30 ms a frame, the vertical 0.06, the
uint8-to-float copy and the two roundings 0.11. The horizontal products run at ~53 GFLOP/s, near this core's
float32 rate, but ~4.7x of their multiplies are by the band's zeros. Tried to skip them, frames identical
each time, and kept out because BLAS runs narrow products slower than the zeros cost (issue 22): blocks of
4-12 outputs or 2-8 frames a product (0.46-0.72 ms against 0.43-0.44 for 16 and 2-4), and a polyphase form
for 744 = 8 x 93 inputs to 224 = 8 x 28 outputs that folds the 8 periods into one product per sub-block of
4-28 outputs (horizontal pass 0.38-0.59 ms against 0.34 in the same run). PIL's reducing path (``reducing_gap`` 2 or 3)
does not reduce at a 3.3x scale: the same 1.8 ms as the naive row.

The bare-image options lose because the footprint of the image in the output is fractional (its edge
shifts by up to half an output pixel) and PIL renormalises the kernel at the image border instead of
mixing in the zeros; INTER_AREA is a box filter, not bicubic. On a whole 840-frame case:
`resize_frames` 0.47-0.61 s, naive 1.70 s (SimpleITK's decode of the same case: ~1 s).

Parity stated and tested (tests/test_preprocess.py, against open_clip's eval transform): at most
1 gray level anywhere (1/255/std <= 0.0150 in normalised units) and a mean absolute difference of at
most 0.001 gray level (1.5e-5 normalised); measured: max 1 level on a few pixels, mean <= 1.2e-4
level. The 1-level differences are float32 sums against PIL's 22-bit fixed point near a .5 tie.

The paper's own code resizes differently, with cv2's INTER_CUBIC (`resize_frames_cv2_cubic`), which does not
antialias: on a 744 px square to 224 each output pixel samples 4 x 4 input pixels of every ~3.3 x 3.3, so
speckle aliases (3.6 gray levels from `resize_frames` on average, 27 at the 99th percentile, over 42
frames of a synthetic ACOUSLIC-size case). A model sees at scoring time the resize it was trained on: its checkpoint names it
(`PreprocessSpec.interpolation`, a key of `RESIZES`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

IMAGE_SIZE = 224
_CHUNK = 4  # frames per matrix product: keeps the float32 working set (~7 MB for 562 x 744) in cache
_BLOCK = 16  # outputs per band block (tuned on 562 x 744 -> 224: 8 is call-bound, 32+ multiplies zeros)


def square_padding(height: int, width: int) -> tuple[int, int, int]:
    """``(side, top, left)`` of the centred zero padding of an ``H x W`` frame to a square.

    ``side = max(H, W)``; an odd difference puts the extra row (column) at the bottom (right).
    """
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def naive_preprocess_frame(frame: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The paper-style reference: ``(H, W)`` uint8 -> ``(size, size)`` uint8.

    `np.pad` to the centred square, then PIL's bicubic resize of the whole padded image, one frame at a
    time. Equal to open_clip's eval transform (before its ToTensor/Normalize) on the padded image.
    """
    height, width = frame.shape
    side, top, left = square_padding(height, width)
    padded = np.pad(frame, ((top, side - height - top), (left, side - width - left)))
    return np.asarray(Image.fromarray(padded).resize((size, size), Image.Resampling.BICUBIC))


def resize_frames(frames: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Centred zero padding to a square and antialiased bicubic resize, as PIL does it.

    Args:
        frames: ``(N, H, W)`` uint8 (read-only arrays are fine).
        size: output side S.
    Returns:
        ``(N, S, S)`` uint8, within 1 gray level of `naive_preprocess_frame` on every frame.
    """
    frames = _checked_frames(frames)
    n, height, width = frames.shape
    side, top, left = square_padding(height, width)
    row_blocks = _bands(height, side, top, size)
    col_blocks = _bands(width, side, left, size)
    col_lo, col_hi = col_blocks[0][0], col_blocks[-1][1]  # output columns the image reaches

    out = np.zeros((n, size, size), np.uint8)
    chunk = np.empty((min(n, _CHUNK), height, width), np.float32)
    tmp = np.zeros((len(chunk), height, size), np.float32)  # after the horizontal pass; padding columns stay 0
    res = np.zeros((len(chunk), size, size), np.float32)  # after the vertical pass; padding rows stay 0
    for start in range(0, n, _CHUNK):
        k = min(_CHUNK, n - start)
        np.copyto(chunk[:k], frames[start : start + k])
        rows_in, rows_out = chunk[:k].reshape(k * height, width), tmp[:k].reshape(k * height, size)  # views
        for o0, o1, i0, i1, weights in col_blocks:
            rows_out[:, o0:o1] = rows_in[:, i0:i1] @ weights.T
        _round_to_uint8_range(tmp[:k])  # PIL keeps the intermediate image in 8 bits
        for o0, o1, i0, i1, weights in row_blocks:
            res[:k, o0:o1, col_lo:col_hi] = weights @ tmp[:k, i0:i1, col_lo:col_hi]
        out[start : start + k] = _round_to_uint8_range(res[:k])
    return out


def resize_frames_cv2_cubic(frames: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Centred zero padding to a square and cv2's INTER_CUBIC, frame by frame: the resize of the paper's
    code (albumentations' ``Resize(interpolation=cv2.INTER_CUBIC)``), which `--recipe paper` trains on.

    Args:
        frames: ``(N, H, W)`` uint8.
        size: output side S.
    Returns:
        ``(N, S, S)`` uint8, equal to ``cv2.resize(padded, (S, S), interpolation=cv2.INTER_CUBIC)``.
    """
    frames = _checked_frames(frames)
    n, height, width = frames.shape
    side, top, left = square_padding(height, width)
    out = np.empty((n, size, size), np.uint8)
    for i, frame in enumerate(frames):
        square = cv2.copyMakeBorder(frame, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT,
                                    value=0)
        out[i] = cv2.resize(square, (size, size), interpolation=cv2.INTER_CUBIC)
    return out


# Resizes by the name a checkpoint records (`PreprocessSpec.interpolation`). "bicubic" is open_clip's
# (PIL, antialiased), which the "fetaliqa" recipe trains on; "cv2-cubic" is the paper's code's.
RESIZES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "bicubic": resize_frames,
    "cv2-cubic": resize_frames_cv2_cubic,
}


def resize_by(name: str) -> Callable[[np.ndarray, int], np.ndarray]:
    """The resize of `RESIZES` called `name`; ValueError naming the known ones otherwise."""
    if name not in RESIZES:
        raise ValueError(f"unknown resize {name!r} (fetaliqa resizes frames by {', '.join(map(repr, RESIZES))})")
    return RESIZES[name]


def _checked_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W) uint8 frames, got {frames.shape} {frames.dtype}")
    return frames


def _round_to_uint8_range(x: np.ndarray) -> np.ndarray:
    """Round half to even and clip to [0, 255], in place."""
    np.round(x, out=x)
    return np.clip(x, 0, 255, out=x)


@functools.lru_cache(maxsize=64)
def _bands(n: int, side: int, offset: int, size: int) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
    """PIL's bicubic weights for one axis, padded square ``side -> size``, on image pixels [offset, offset+n).

    Returns blocks ``(out0, out1, in0, in1, weights)``: outputs ``out0:out1`` are ``weights @ x[in0:in1]``
    with ``weights`` float32 ``(out1 - out0, in1 - in0)`` and ``in`` indices relative to the image.
    Blocks whose outputs lie wholly in the padding are left out.
    """
    scale = side / size
    stretch = max(scale, 1.0)  # antialias: the kernel widens by the downscale factor
    centre = (np.arange(size) + 0.5) * scale
    dist = (np.arange(side)[None, :] + 0.5 - centre[:, None]) / stretch
    weights = _bicubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)  # over the whole padded square, as PIL normalises
    weights = weights[:, offset : offset + n]  # padding pixels are 0: drop their weights
    blocks = []
    for o0 in range(0, size, _BLOCK):
        block = weights[o0 : o0 + _BLOCK]
        used = np.flatnonzero(np.any(block != 0, axis=0))
        if used.size:
            i0, i1 = int(used[0]), int(used[-1]) + 1
            blocks.append((o0, o0 + len(block), i0, i1, np.ascontiguousarray(block[:, i0:i1], np.float32)))
    return tuple(blocks)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """PIL's bicubic kernel (Keys, a = -0.5), support 2."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def mask_to_native(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo the resize and the padding of model-resolution masks.

    Args:
        masks: ``(N, S, S)`` bool, {0, 1}, or float probabilities (numpy or a CPU tensor).
        height, width: the native frame size H, W.
    Returns:
        ``(N, H, W)`` bool: the square resized back to ``max(H, W)`` (bilinear, on probabilities), the
        centred ``H x W`` cropped out (the padding of `square_padding`), then ``p > 0.5``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"expected (N, S, S) masks, got {masks.shape}")
    side, top, left = square_padding(height, width)
    out = np.empty((len(masks), height, width), bool)
    for i, mask in enumerate(masks):
        prob = cv2.resize(mask.astype(np.float32, copy=False), (side, side), interpolation=cv2.INTER_LINEAR)
        out[i] = prob[top : top + height, left : left + width] > 0.5
    return out


def mask_to_model(masks: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Label masks to model resolution, for SEG training targets.

    Args:
        masks: ``(N, H, W)`` uint8 labels (0 background, 1 optimal, 2 suboptimal).
        size: output side S.
    Returns:
        ``(N, S, S)`` uint8 in {0, 1} (label > 0), zero-padded like the frames (`square_padding`) and
        resized by nearest neighbour: output pixel i samples padded pixel ``floor((i + 0.5) * side / S)``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got {masks.shape}")
    n, height, width = masks.shape
    side, top, left = square_padding(height, width)
    src = np.floor((np.arange(size) + 0.5) * side / size).astype(np.int64)
    rows, cols = src - top, src - left
    r0, r1 = np.searchsorted(rows, 0), np.searchsorted(rows, height)  # outputs inside the image
    c0, c1 = np.searchsorted(cols, 0), np.searchsorted(cols, width)
    out = np.zeros((n, size, size), np.uint8)
    out[:, r0:r1, c0:c1] = masks[:, rows[r0:r1]][:, :, cols[c0:c1]] > 0
    return out
