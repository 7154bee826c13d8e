"""Train-time augmentation on hand-made frames: shapes and dtypes kept, shared geometry, seeded draws."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fetaliqa.training.augment import (
    AugmentSpec,
    affine_matrix,
    augment_batch,
    augment_frame,
    clahe,
    jitter,
    pad_to_square,
    paper_augment,
    paper_copies,
    warp,
)

S = 224
GEOMETRY_ONLY = AugmentSpec(brightness=0.0, contrast=0.0, clahe_p=0.0)


def ellipse_mask(centre=(112, 100), axes=(40, 22), angle=30) -> np.ndarray:
    mask = np.zeros((S, S), np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, thickness=-1)
    return mask


def test_jitter_by_hand():
    image = np.array([[0, 100], [200, 250]], np.uint8)
    assert np.array_equal(jitter(image, 1.0, 1.0), image)
    # brightness 1.2: 0, 120, 240, 300 -> clipped 255; mean 153.75; contrast 0.5 blends halfway to it
    expected = np.rint((np.array([[0, 120], [240, 255]]) - 153.75) * 0.5 + 153.75).astype(np.uint8)
    out = jitter(image, 1.2, 0.5)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_clahe_keeps_shape_and_dtype_and_stretches_a_flat_image():
    rng = np.random.default_rng(0)
    image = (100 + rng.integers(0, 8, (S, S))).astype(np.uint8)  # low contrast
    out = clahe(image, clip_limit=4.0)
    assert out.shape == (S, S) and out.dtype == np.uint8
    assert out.std() > 2 * image.std()


def test_warp_translates_and_rotates_as_stated():
    image = np.zeros((S, S), np.uint8)
    image[50, 60] = 255  # row 50, column 60
    moved = warp(image, affine_matrix(S, (10.0, -5.0), 0.0), nearest=True)
    assert np.argwhere(moved == 255).tolist() == [[45, 70]]  # x + 10, y - 5
    # 90 degrees counter-clockwise about the centre (111.5, 111.5): (x, y) -> (y, 223 - x)
    turned = warp(image, affine_matrix(S, (0.0, 0.0), 90.0), nearest=True)
    assert np.argwhere(turned == 255).tolist() == [[223 - 60, 50]]
    assert moved.dtype == turned.dtype == np.uint8


@pytest.mark.parametrize("seed", range(5))
def test_image_and_mask_get_the_same_geometry(seed):
    mask = ellipse_mask()
    image = (mask * 200).astype(np.uint8)
    out_image, out_mask = augment_frame(image, mask, np.random.default_rng(seed))
    assert out_image.shape == out_mask.shape == (S, S) and out_image.dtype == out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 1}
    bright = out_image > out_image.max() / 2
    overlap = np.logical_and(bright, out_mask).sum() / np.logical_or(bright, out_mask).sum()
    assert overlap > 0.9
    assert not np.array_equal(out_mask, mask)  # it did move


def test_draws_are_seeded():
    mask = ellipse_mask()
    image = (mask * 150 + 30).astype(np.uint8)
    a = augment_frame(image, mask, np.random.default_rng(7))
    b = augment_frame(image, mask, np.random.default_rng(7))
    c = augment_frame(image, mask, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_translation_stays_within_20_percent_and_rotation_keeps_the_centre_fixed():
    image = np.zeros((S, S), np.uint8)
    image[111:113, 111:113] = 255  # the 2 x 2 centre: rotation about it leaves it in place
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(200):
        out, _ = augment_frame(image, None, rng, GEOMETRY_ONLY)
        shifts.append(np.argwhere(out > 0).mean(axis=0) - 111.5)
    shifts = np.abs(np.array(shifts))
    assert shifts.max() <= 0.2 * S + 1  # +1: bilinear spread of the dot
    assert shifts.max() > 0.15 * S  # and the range is used, both axes
    assert (shifts.max(axis=0) > 0.15 * S).all()


def test_augment_batch_replaces_image_and_mask_and_is_a_function_of_its_batch():
    mask = np.stack([ellipse_mask(), ellipse_mask((90, 120))])
    batch = {"case_id": np.array(["a", "b"], dtype=object), "frame": np.array([3, 4], np.int32),
             "label": np.array([1, 1], np.uint8), "image": (mask * 180).astype(np.uint8), "mask": mask}
    out = augment_batch(batch, seed=0)
    assert set(out) == set(batch)
    assert out["image"].shape == (2, S, S) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (2, S, S) and out["mask"].dtype == np.uint8
    assert np.array_equal(out["label"], batch["label"]) and np.array_equal(out["frame"], batch["frame"])
    again = augment_batch(batch, seed=0)  # a retried task gives the same frames
    assert np.array_equal(out["image"], again["image"]) and np.array_equal(out["mask"], again["mask"])
    assert not np.array_equal(out["image"], augment_batch(batch, seed=1)["image"])
    cls_batch = {k: v for k, v in batch.items() if k != "mask"}
    assert set(augment_batch(cls_batch, seed=0)) == set(cls_batch)  # CLS frames carry no mask
    assert np.array_equal(batch["mask"], mask)  # inputs untouched


# ------------------------------------------------------------------------------- the paper's recipe

def native_case(height=30, width=40):
    """A native frame (H, W) with an ellipse of label 2 near its right edge, and its mask."""
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (37, 15), (2, 2), 0, 0, 360, 2, thickness=-1)
    frame = (np.arange(height * width).reshape(height, width) % 200 + 20).astype(np.uint8)
    return frame, mask


def test_paper_copy_0_is_the_plain_padded_frame_resized_cubic_and_its_mask_nearest():
    frame, mask = native_case()
    padded = np.zeros((40, 40), np.uint8)
    padded[5:35] = frame  # (40 - 30) // 2 = 5 rows on top
    padded_mask = np.zeros((40, 40), np.uint8)
    padded_mask[5:35] = mask > 0
    [(image, label_mask, label)] = paper_copies(frame, mask, copies=1, rng=np.random.default_rng(0), size=16)
    assert np.array_equal(pad_to_square(frame), padded)
    assert np.array_equal(image, cv2.resize(padded, (16, 16), interpolation=cv2.INTER_CUBIC))
    assert np.array_equal(label_mask, cv2.resize(padded_mask, (16, 16), interpolation=cv2.INTER_NEAREST))
    assert not np.array_equal(image, cv2.resize(padded, (16, 16), interpolation=cv2.INTER_LINEAR))
    assert set(np.unique(label_mask)) == {0, 1} and label == 1


def test_paper_copy_1_is_augmented_at_native_size_and_its_label_recomputed_after_the_affine():
    frame, mask = native_case()
    labels = []
    for seed in range(40):
        copies = paper_copies(frame, mask, copies=2, rng=np.random.default_rng(seed), size=16)
        assert len(copies) == 2 and copies[0][2] == 1
        image, label_mask, label = copies[1]
        assert image.shape == label_mask.shape == (16, 16) and image.dtype == label_mask.dtype == np.uint8
        assert label == int(label_mask.any())  # from the copy's own mask, after the affine and the resize
        # The same geometry on image and mask: redo the draws (paper_augment consumes them in order).
        aug_image, aug_mask = paper_augment(pad_to_square(frame), (pad_to_square(mask) > 0).astype(np.uint8),
                                            np.random.default_rng(seed))
        assert np.array_equal(image, cv2.resize(aug_image, (16, 16), interpolation=cv2.INTER_CUBIC))
        assert np.array_equal(label_mask, cv2.resize(aug_mask, (16, 16), interpolation=cv2.INTER_NEAREST))
        labels.append(label)
    # The abdomen sits near the edge: some shifts take it out of the frame, and those copies are negatives.
    assert 0 < sum(labels) < len(labels)


def test_paper_augment_jitters_half_the_time_and_moves_always():
    image = (np.arange(64 * 64).reshape(64, 64) % 97 + 60).astype(np.uint8)
    dot = np.zeros((64, 64), np.uint8)
    dot[31:33, 31:33] = 1
    rng = np.random.default_rng(3)
    moved = sum(not np.array_equal(paper_augment(image, dot, rng)[1], dot) for _ in range(100))
    assert moved >= 95
    no_affine = AugmentSpec(translate=0.0, rotate_deg=0.0, clahe_p=0.0)
    jittered = sum(not np.array_equal(paper_augment(image, dot, rng, no_affine)[0], image) for _ in range(400))
    assert 150 < jittered < 250  # p = 0.5
