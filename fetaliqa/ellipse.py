"""Abdominal circumference from a segmentation mask: OpenCV ellipse fit, Ramanujan perimeter, in mm."""

from __future__ import annotations

import math

import cv2
import numpy as np


def ramanujan_perimeter(semi_major: float, semi_minor: float) -> float:
    """Perimeter of an ellipse with semi-axes a, b (Ramanujan's second approximation, error < 1e-5 a)."""
    a, b = semi_major, semi_minor
    h = ((a - b) / (a + b)) ** 2 if a + b > 0 else 0.0
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def mask_circumference_mm(mask: np.ndarray, spacing_mm: tuple[float, float]) -> float | None:
    """Circumference in mm of the ellipse fitted to the largest region of `mask`.

    mask: (H, W) bool or 0/1 array at native resolution. spacing_mm: (row, col) pixel spacing. The
    contour is scaled to mm before the fit, so anisotropic pixels are handled. None when the mask has
    no region with the 5 contour points that `cv2.fitEllipse` needs.
    """
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    if len(largest) < 5:
        return None
    points_mm = largest.reshape(-1, 2).astype(np.float32) * np.float32([spacing_mm[1], spacing_mm[0]])
    _, (axis_1, axis_2), _ = cv2.fitEllipse(points_mm)
    return ramanujan_perimeter(max(axis_1, axis_2) / 2, min(axis_1, axis_2) / 2)
