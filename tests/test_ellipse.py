"""Abdominal circumference from a mask, against perimeters worked out by hand."""

import math

import cv2
import numpy as np
import pytest

from fetaliqa.ellipse import mask_circumference_mm, ramanujan_perimeter


def filled_ellipse(shape, centre, semi_axes_px, angle=0.0) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, centre, semi_axes_px, angle, 0, 360, 1, thickness=-1)
    return mask


def test_ramanujan_is_exact_for_a_circle_and_close_for_an_ellipse():
    assert ramanujan_perimeter(10, 10) == pytest.approx(2 * math.pi * 10, rel=1e-12)
    # a = 2, b = 1: the perimeter is 9.688448220547675... (complete elliptic integral)
    assert ramanujan_perimeter(2, 1) == pytest.approx(9.688448220547675, rel=1e-9)


def test_circumference_of_a_drawn_ellipse_in_mm():
    mask = filled_ellipse((300, 400), (200, 150), (120, 60), angle=30)
    expected = ramanujan_perimeter(120 * 0.28, 60 * 0.28)
    # contours run through the centres of boundary pixels, about half a pixel inside the edge
    assert mask_circumference_mm(mask, (0.28, 0.28)) == pytest.approx(expected, rel=0.02)


def test_anisotropic_pixels_are_scaled_before_the_fit():
    # 10 mm radius circle: 20 rows of 0.5 mm, 40 columns of 0.25 mm
    mask = filled_ellipse((100, 120), (60, 50), (40, 20))
    assert mask_circumference_mm(mask, (0.5, 0.25)) == pytest.approx(2 * math.pi * 10, rel=0.03)


def test_the_largest_region_wins_and_tiny_or_empty_masks_give_none():
    mask = filled_ellipse((200, 200), (100, 100), (50, 50))
    mask[5:8, 5:8] = 1
    assert mask_circumference_mm(mask, (1.0, 1.0)) == pytest.approx(2 * math.pi * 50, rel=0.02)
    assert mask_circumference_mm(np.zeros((50, 50), bool), (1.0, 1.0)) is None
    single = np.zeros((50, 50), bool)
    single[10, 10] = True
    assert mask_circumference_mm(single, (1.0, 1.0)) is None
