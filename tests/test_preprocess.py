"""Preprocessing: parity with open_clip's eval transform, shapes, constants, and the mask round trip."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image

from fetaliqa import preprocess as P
from fetaliqa.models.normalize import normalize_frames, preprocess_frames

MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
# Parity tolerance, stated in gray levels (0..255) and normalised units (gray / 255 / std).
MAX_GRAY, MEAN_GRAY = 1.0, 1e-3
MAX_NORM = MAX_GRAY / 255 / min(OPENAI_DATASET_STD) + 1e-6  # 0.0146
MEAN_NORM = MEAN_GRAY / 255 / min(OPENAI_DATASET_STD)  # 1.5e-5


def speckle_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(n, H, W)`` uint8: Rayleigh speckle over smooth tissue in a fan-shaped field of view, a bright
    elliptical abdomen and a dark cyst; zeros outside the fan."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    apex_x, radius = width / 2, 0.95 * height
    fan = (np.hypot(yy, xx - apex_x) < radius) & (np.abs(np.arctan2(xx - apex_x, yy + 1)) < 0.75)
    out = np.empty((n, height, width), np.uint8)
    for i in range(n):
        coarse = rng.random((height // 16 + 2, width // 16 + 2)).astype(np.float32)
        tissue = np.kron(coarse, np.ones((16, 16), np.float32))[:height, :width]
        cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
        abdomen = ((yy - cy) / (0.22 * height)) ** 2 + ((xx - cx) / (0.2 * width)) ** 2 < 1
        cyst = np.hypot(yy - cy, xx - cx) < 0.05 * min(height, width)
        amplitude = 50 + 70 * tissue + 60 * abdomen - 90 * cyst
        frame = rng.rayleigh(1.0, (height, width)).astype(np.float32) * np.maximum(amplitude, 5)
        out[i] = np.clip(frame, 0, 255).astype(np.uint8) * fan
    return out


@pytest.fixture(scope="module")
def open_clip_eval():
    return image_transform(
        224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD, interpolation="bicubic"
    )


def open_clip_reference(frames: np.ndarray, transform) -> torch.Tensor:
    """open_clip's own eval transform on the zero-padded RGB image, frame by frame: ``(N, 3, 224, 224)``."""
    out = []
    for frame in frames:
        h, w = frame.shape
        side, top, left = P.square_padding(h, w)
        padded = np.zeros((side, side), np.uint8)
        padded[top : top + h, left : left + w] = frame
        out.append(transform(Image.fromarray(padded).convert("RGB")))
    return torch.stack(out)


SHAPES = [(562, 744), (141, 187), (200, 120), (563, 744), (224, 224), (90, 100)]


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_open_clip_eval_transform(shape, open_clip_eval):
    frames = speckle_frames(3, *shape, seed=sum(shape))
    ours = preprocess_frames(frames)
    reference = open_clip_reference(frames, open_clip_eval)
    diff = (ours - reference).abs()
    assert diff.max().item() <= MAX_NORM, diff.max().item()
    assert diff.mean().item() <= MEAN_NORM, diff.mean().item()


@pytest.mark.parametrize("shape", SHAPES)
def test_resize_matches_naive_reference_in_gray_levels(shape):
    frames = speckle_frames(4, *shape, seed=1)
    ours = P.resize_frames(frames).astype(np.int16)
    naive = np.stack([P.naive_preprocess_frame(f) for f in frames]).astype(np.int16)
    diff = np.abs(ours - naive)
    assert diff.max() <= MAX_GRAY and diff.mean() <= MEAN_GRAY


def test_naive_reference_is_open_clip_transform(open_clip_eval):
    frames = speckle_frames(2, 141, 187)
    naive = np.stack([P.naive_preprocess_frame(f) for f in frames])
    expected = open_clip_reference(frames, open_clip_eval)
    torch.testing.assert_close(normalize_frames(torch.from_numpy(naive)), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(562, 744), (141, 187), (200, 120)])
def test_the_papers_resize_is_cv2_cubic_of_the_padded_square_without_antialiasing(shape):
    frames = speckle_frames(3, *shape, seed=2)
    side, top, left = P.square_padding(*shape)
    cv2_resized = P.resize_by("cv2-cubic")(frames, 224)
    for frame, ours in zip(frames, cv2_resized):
        padded = np.pad(frame, ((top, side - shape[0] - top), (left, side - shape[1] - left)))
        assert np.array_equal(ours, cv2.resize(padded, (224, 224), interpolation=cv2.INTER_CUBIC))
    # without an antialiasing filter a 3.3x downscale aliases speckle: far from open_clip's resize (14 levels
    # on average here; 1.3-1.5 on the upscales, from cv2's cubic a = -0.75 against PIL's -0.5)
    gap = np.abs(cv2_resized.astype(np.int16) - P.resize_by("bicubic")(frames, 224)).mean()
    assert gap > 5 if side > 224 else 0.5 < gap < 5


def test_a_resize_is_named_by_a_known_key():
    assert P.resize_by("bicubic") is P.resize_frames
    with pytest.raises(ValueError, match="unknown resize 'bilinear' .*'bicubic', 'cv2-cubic'"):
        P.resize_by("bilinear")
    with pytest.raises(ValueError, match=r"expected \(N, H, W\) uint8 frames"):
        P.resize_frames_cv2_cubic(np.zeros((2, 3), np.uint8))


def test_shapes_and_dtypes():
    frames = speckle_frames(5, 141, 187)
    resized = P.resize_frames(frames)
    assert resized.shape == (5, 224, 224) and resized.dtype == np.uint8
    model_input = normalize_frames(torch.from_numpy(resized))
    assert model_input.shape == (5, 3, 224, 224) and model_input.dtype == torch.float32
    assert preprocess_frames(frames, size=64).shape == (5, 3, 64, 64)
    assert P.resize_frames(frames[:0]).shape == (0, 224, 224)
    assert P.naive_preprocess_frame(frames[0]).shape == (224, 224)


def test_three_identical_gray_channels():
    x = preprocess_frames(speckle_frames(2, 200, 120))
    gray = x * STD + MEAN  # undo the per-channel normalisation
    torch.testing.assert_close(gray[:, 0], gray[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(gray[:, 0], gray[:, 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(562, 744), (200, 120)])
@pytest.mark.parametrize("value", [0, 1, 128, 255])
def test_constant_frame_maps_to_normalised_value_and_padding_to_zero(shape, value):
    h, w = shape
    x = preprocess_frames(np.full((1, h, w), value, np.uint8))[0]
    side, top, left = P.square_padding(h, w)
    scale = 224 / side
    margin = 3  # output pixels next to the image edge mix image and padding (bicubic support)
    r0, r1 = int(np.ceil(top * scale)) + margin, int((top + h) * scale) - margin
    c0, c1 = int(np.ceil(left * scale)) + margin, int((left + w) * scale) - margin
    inside = x[:, r0:r1, c0:c1]
    expected = (torch.tensor([value / 255] * 3) - MEAN.view(3)) / STD.view(3)
    torch.testing.assert_close(inside, expected.view(3, 1, 1).expand_as(inside), rtol=0, atol=1e-6)
    padding = (0 - MEAN.view(3)) / STD.view(3)
    pad_band = x[:, : max(r0 - 2 * margin, 0)] if h < w else x[:, :, : max(c0 - 2 * margin, 0)]
    assert pad_band.numel() > 0
    torch.testing.assert_close(pad_band, padding.view(3, 1, 1).expand_as(pad_band), rtol=0, atol=1e-6)


def test_read_only_input_and_validation():
    frames = speckle_frames(2, 141, 187)
    frames.setflags(write=False)  # as Ray hands out arrays from its object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resized = P.resize_frames(frames)
        resized.setflags(write=False)
        normalize_frames(resized)
    with pytest.raises(ValueError):
        P.resize_frames(frames.astype(np.float32))
    with pytest.raises(ValueError):
        P.resize_frames(frames[0])
    with pytest.raises(ValueError):
        normalize_frames(torch.zeros((2, 3, 8, 8), dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_normalize_stays_on_the_device():
    images = torch.from_numpy(P.resize_frames(speckle_frames(2, 141, 187)))
    on_gpu = normalize_frames(images.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), normalize_frames(images), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- masks


def ellipse(height, width, cy, cx, ry, rx):
    yy, xx = np.mgrid[:height, :width]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(
    "shape, ellipse_args",
    [((562, 744), (300, 350, 120, 160)), ((200, 120), (100, 60, 50, 35)), ((141, 187), (80, 90, 40, 50))],
)
def test_mask_round_trip_recovers_filled_ellipse(shape, ellipse_args):
    labels = ellipse(*shape, *ellipse_args) * 2  # a suboptimal-plane label: any label > 0 counts
    model = P.mask_to_model(labels[None])
    assert model.shape == (1, 224, 224) and model.dtype == np.uint8 and set(np.unique(model)) == {0, 1}
    native = P.mask_to_native(model, *shape)
    assert native.shape == (1, *shape) and native.dtype == bool
    assert dice(native[0], labels > 0) >= 0.97


def test_mask_to_model_samples_nearest_pixel_of_the_padded_square():
    labels = np.random.default_rng(0).integers(0, 3, (2, 141, 187)).astype(np.uint8)
    side, top, left = P.square_padding(141, 187)
    padded = np.zeros((2, side, side), np.uint8)
    padded[:, top : top + 141, left : left + 187] = labels > 0
    src = np.floor((np.arange(224) + 0.5) * side / 224).astype(int)
    np.testing.assert_array_equal(P.mask_to_model(labels), padded[:, src][:, :, src])


@pytest.mark.parametrize("shape", [(562, 744), (200, 120), (141, 187)])
def test_mask_to_native_of_square_mask_has_native_shape(shape):
    square = np.zeros((3, 224, 224), bool)
    square[1] = True
    probabilities = np.random.default_rng(0).random((3, 224, 224)).astype(np.float32)
    for masks in (square, probabilities, torch.from_numpy(probabilities)):
        native = P.mask_to_native(masks, *shape)
        assert native.shape == (3, *shape) and native.dtype == bool
    native = P.mask_to_native(square, *shape)
    assert not native[0].any() and native[1].all()


def test_mask_to_native_thresholds_probabilities_at_one_half():
    probabilities = np.full((1, 224, 224), 0.5, np.float32)
    assert not P.mask_to_native(probabilities, 562, 744).any()  # p > 0.5, strictly
    probabilities[:] = 0.51
    assert P.mask_to_native(probabilities, 562, 744).all()
