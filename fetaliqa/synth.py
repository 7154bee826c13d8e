"""Synthetic archives in the exact ACOUSLIC-AI layout (see `fetaliqa.layout`), deterministic by seed.

Each case is a stack of 6 sweeps of K frames, T x H x W uint8 (T = 6 K), inside a curvilinear fan
field of view (FOV): a smooth tissue background that changes slowly from frame to frame, depth
attenuation, a bright skin line and multiplicative Rayleigh speckle; 0 outside the fan. Some sweeps
(2 to 4 per case) pass over an elliptical fetal abdomen (bright rim, darker interior, a bright spine
dot and a dark stomach): its cross-section grows then shrinks over a run of frames. The frames near
the widest part are labelled 1 (optimal) in the mask, those on its flanks 2 (suboptimal); the mask
fills the ellipse. One or two frames beyond each end of the run show a smaller, much fainter ellipse
and are not labelled. About 3.5-8.5% of the frames of each case are positive (drawn per case), like
the 2.6-8.6% of the challenge data. A sweep's abdominal circumference (AC) is the Ramanujan perimeter
of its largest optimal ellipse times the 0.28 mm spacing; sweeps that miss the abdomen have none.

Case i depends only on (seed, i, K, H, W): archives with more cases extend those with fewer.
"""

from __future__ import annotations

import csv
import io
import math
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import SimpleITK as sitk

from fetaliqa import layout
from fetaliqa.ellipse import ramanujan_perimeter
from fetaliqa.storage import StorageOptions, filesystem, is_local

SPACING_MM = 0.28  # in-plane pixel spacing of the challenge data (x and y); the frame axis gets 1.0

# Fan geometry, measured once from the challenge's own FOV mask
# (shared/reference/acouslic_fov_mask.mha, 562 x 744 float32, 1 inside) by fitting the two straight
# edges (residual <= 0.5 px) and the two arcs (std <= 0.7 px); Dice of `_fov_mask(562, 744)` with it:
# 0.9989. The fan is scaled to any H x W: x by W, y and the radii by H (at the reference aspect).
_REF_ASPECT = 744 / 562  # reference W / H, so that radii are isotropic in reference pixels
_APEX_X = 0.5  # apex x / W (372.0 px): the fan is centred
_APEX_Y = -0.32778  # apex y / H (-184.2 px): the apex lies above the image
_R_IN = 0.37794  # inner (skin-line) radius / H (212.4 px)
_R_OUT = 1.33007  # outer radius / H (747.5 px); it meets the image's sides and bottom
_HALF_ANGLE = math.radians(29.884)  # half the opening angle (59.8 deg in all)

_CHUNK = 32  # frames rendered at once: bounds memory to ~0.25 GB at 562 x 744
_KEY_EVERY = 10  # frames between key frames of the tissue field
_FIELD_SHAPE = (12, 16)  # low-resolution grid of the tissue field, upsampled to H x W
_FAINT = 0.1  # contrast of the unlabelled ellipse just outside a labelled run
# Echo gain of the abdomen's rim (0.75 < rho <= 1 in ellipse-normalised radius) and interior (rho < 0.75).
# Strong enough that fetalclip-tiny, randomly initialised, learns the task in a few CPU epochs (the demo);
# at rim 2.3, interior 0.45 (rho < 0.84) and _FAINT 0.25 it stayed at chance after 6 epochs.
_RIM = 3.5
_INTERIOR = 0.15
_INTERIOR_RHO = 0.75
_SCALE_SLOPE = 0.8  # cross-section s(u) = sqrt(1 - (0.8 u)^2); labelled while |u| < 1, so s >= 0.6
_OPTIMAL_U = 0.4  # frames with |u| <= 0.4 are optimal (1), the rest of the run suboptimal (2)


@dataclass
class _Frames:
    """Per-frame abdomen parameters of one case, each of shape (T,) float32 (label: uint8)."""

    scale: np.ndarray  # 0 where no abdomen is visible, else the cross-section's relative size
    contrast: np.ndarray  # 1 in labelled frames, _FAINT in the visible unlabelled ones
    label: np.ndarray  # 0, 1 (optimal) or 2 (suboptimal)
    cx: np.ndarray  # ellipse centre (pixels)
    cy: np.ndarray
    a: np.ndarray  # full-size semi-axes (pixels) and rotation (radians)
    b: np.ndarray
    angle: np.ndarray
    spine: np.ndarray  # direction of the spine inside the ellipse (radians)


def write_synthetic_archive(
    out_url: str,
    cases: int,
    frames_per_sweep: int = 140,
    height: int = 562,
    width: int = 744,
    seed: int = 0,
    storage_options: StorageOptions = None,
) -> list[str]:
    """Write `cases` synthetic cases in the ACOUSLIC-AI layout under `out_url`; return their ids.

    Parameters
    ----------
    out_url : a local path or any fsspec URL (s3://, memory://, ...); created if missing.
    cases : number of cases (>= 1).
    frames_per_sweep : K (>= 1); each stack holds T = 6 K frames.
    height, width : frame size H x W (>= 32 each).
    seed : the same arguments give byte-identical files' arrays; other seeds differ.
    storage_options : passed to fsspec.

    Writes ``images/stacked_fetal_ultrasound/<uuid>.mha`` (T x H x W uint8) and
    ``masks/stacked_fetal_abdomen/<uuid>.mha`` (T x H x W uint8 in {0, 1, 2}), both zlib-compressed
    with spacing (0.28, 0.28, 1.0) mm, and ``circumferences/fetal_abdominal_circumferences_per_sweep.csv``.

    Timing (measured on the 2-core dev machine): one full-size case (840 x 562 x 744) renders in
    ~3.5 s; compressing and writing its two volumes (~176 MB image .mha) takes ~3.5 s more.
    """
    fs, root = filesystem(out_url, storage_options)
    local = is_local(out_url)
    rows, ids = [], []
    with tempfile.TemporaryDirectory(prefix="fetaliqa-synth-") as tmp:
        for case in synthetic_cases(cases, frames_per_sweep, height, width, seed):
            for folder, volume in ((layout.IMAGES_DIR, case.image), (layout.MASKS_DIR, case.mask)):
                put_volume(fs, posixpath.join(root, folder, f"{case.case_id}.mha"), volume, tmp, local)
            rows.append(case.csv_row())
            ids.append(case.case_id)
        put_csv(fs, posixpath.join(root, layout.CIRCUMFERENCES_CSV), rows, local)
    return ids


@dataclass
class SyntheticCase:
    """One generated case: image and mask ``(T, H, W)`` uint8, and the six per-sweep ACs in mm (None: none)."""

    case_id: str
    subject_id: str
    image: np.ndarray
    mask: np.ndarray
    ac_mm: list[float | None]

    def csv_row(self, case_id: str | None = None) -> list[str]:
        """The case's row of the circumferences CSV, under `case_id` when given (else its own id)."""
        return [case_id or self.case_id, self.subject_id] + ["" if ac is None else f"{ac:.2f}" for ac in self.ac_mm]


def synthetic_cases(cases: int, frames_per_sweep: int, height: int, width: int, seed: int) -> Iterator[SyntheticCase]:
    """Generate the cases of `write_synthetic_archive` one at a time (the same arguments, the same cases)."""
    _check_arguments(cases, frames_per_sweep, height, width)
    for child in np.random.SeedSequence(seed).spawn(cases):
        rng = np.random.default_rng(child)
        case_id, subject_id = _uuid4(rng), _uuid4(rng)
        image, mask, ac_mm = _synth_case(rng, frames_per_sweep, height, width)
        yield SyntheticCase(case_id, subject_id, image, mask, ac_mm)


def _check_arguments(cases: int, frames_per_sweep: int, height: int, width: int) -> None:
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if frames_per_sweep < 1:
        raise ValueError(f"frames_per_sweep must be >= 1, got {frames_per_sweep}")
    if height < 32 or width < 32:
        raise ValueError(f"height and width must be >= 32, got {height} x {width}")


def _uuid4(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


# ----------------------------------------------------------------------------------------------
# Geometry


def _fan_polar(x: np.ndarray, y: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Radius (in units of H at the reference aspect) and angle (radians, 0 straight down) of pixel
    coordinates `x`, `y` (pixel centres at integers; any broadcastable shapes) in an H x W frame."""
    dx = ((x + 0.5) / width - _APEX_X) * _REF_ASPECT
    dy = (y + 0.5) / height - _APEX_Y
    return np.hypot(dx, dy), np.arctan2(dx, dy)


def _fov_mask(height: int, width: int) -> np.ndarray:
    """The fan-shaped field of view of an H x W frame: (H, W) bool, True inside."""
    r, theta = _fan_polar(np.arange(width)[None, :], np.arange(height)[:, None], height, width)
    return (r >= _R_IN) & (r <= _R_OUT) & (np.abs(theta) <= _HALF_ANGLE)


def _fits_in_fan(cx: float, cy: float, a: float, b: float, angle: float, height: int, width: int) -> bool:
    """Whether the ellipse lies inside the fan with a margin of 3% of H."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = cx + a * np.cos(t) * np.cos(angle) - b * np.sin(t) * np.sin(angle)
    y = cy + a * np.cos(t) * np.sin(angle) + b * np.sin(t) * np.cos(angle)
    r, theta = _fan_polar(x, y, height, width)
    inside = (r >= _R_IN + 0.03) & (r <= _R_OUT - 0.03) & (np.abs(theta) <= _HALF_ANGLE - 0.03)
    inside &= (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return bool(inside.all())


# ----------------------------------------------------------------------------------------------
# Where the abdomen appears


def _plan_frames(rng: np.random.Generator, k: int, height: int, width: int) -> tuple[_Frames, list]:
    """Choose the sweeps that cross the abdomen and fill the per-frame parameters.

    Returns the parameters (each (6 K,)) and the AC in mm of each of the 6 sweeps (None if none).
    """
    t = layout.SWEEPS_PER_CASE * k
    frames = _Frames(*(np.zeros(t, np.float32) for _ in range(9)))
    frames.label = np.zeros(t, np.uint8)
    positives = max(1, round(rng.uniform(0.035, 0.085) * t))
    crossings = min(int(rng.integers(2, 5)), max(1, positives // 3), layout.SWEEPS_PER_CASE)
    sweeps = sorted(rng.choice(layout.SWEEPS_PER_CASE, crossings, replace=False).tolist())
    ac_mm: list = [None] * layout.SWEEPS_PER_CASE
    for i, sweep in enumerate(sweeps):
        run = min(k, positives // crossings + (i < positives % crossings))
        ac_mm[sweep] = _plan_crossing(rng, frames, sweep * k, k, run, height, width)
    return frames, ac_mm


def _plan_crossing(rng, frames: _Frames, first: int, k: int, run: int, height: int, width: int) -> float:
    """Place one passage over the abdomen in the sweep starting at frame `first`; return its AC (mm)."""
    faint = int(math.ceil(run / 2 / _SCALE_SLOPE - run / 2))  # faint frames on each side
    lo, hi = (faint, k - run - faint) if k - run >= 2 * faint else (0, k - run)
    start = first + int(rng.integers(lo, hi + 1))  # the whole passage stays in the sweep if it can
    a, b, angle, cx, cy, drift = _place_ellipse(rng, height, width)
    idx = np.arange(first, first + k)
    u = (idx - (start + (run - 1) / 2)) / (run / 2)
    seen = np.abs(u) * _SCALE_SLOPE < 1
    labelled = np.abs(u) < 1
    optimal = labelled & (np.abs(u) <= max(_OPTIMAL_U, np.abs(u).min()))
    f = idx[seen]
    frames.scale[f] = np.sqrt(1 - (_SCALE_SLOPE * u[seen]) ** 2)
    frames.contrast[f] = np.where(labelled[seen], 1.0, _FAINT)
    frames.label[idx[labelled]] = layout.MASK_SUBOPTIMAL
    frames.label[idx[optimal]] = layout.MASK_OPTIMAL
    frames.cx[f], frames.cy[f] = cx + drift[0] * u[seen], cy + drift[1] * u[seen]
    frames.a[f], frames.b[f], frames.angle[f] = a, b, angle
    frames.spine[f] = rng.uniform(0, 2 * np.pi)
    widest = float(frames.scale[idx[optimal]].max())
    return ramanujan_perimeter(a * widest, b * widest) * SPACING_MM


def _place_ellipse(rng: np.random.Generator, height: int, width: int):
    """Semi-axes (pixels), rotation, centre and drift (pixels per unit of u) of an abdomen in the fan."""
    for attempt in range(200):
        a = rng.uniform(0.15, 0.21) * min(height, width / _REF_ASPECT) * (0.995**attempt)
        b = a * rng.uniform(0.75, 0.92)
        angle = rng.uniform(0, np.pi)
        r = rng.uniform(_R_IN + 0.1, _R_OUT - 0.2)
        theta = rng.uniform(-0.6, 0.6) * _HALF_ANGLE
        cx = (_APEX_X + r * np.sin(theta) / _REF_ASPECT) * width - 0.5
        cy = (_APEX_Y + r * np.cos(theta)) * height - 0.5
        drift = rng.uniform(-0.02, 0.02, 2) * height
        ends = [(cx + e * drift[0], cy + e * drift[1]) for e in (-1 / _SCALE_SLOPE, 1 / _SCALE_SLOPE)]
        if all(_fits_in_fan(x, y, a, b, angle, height, width) for x, y in ends):
            return a, b, angle, cx, cy, drift
    raise RuntimeError(f"cannot place an abdomen in a {height} x {width} fan")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# Rendering


def _synth_case(rng: np.random.Generator, k: int, height: int, width: int):
    """One case: image (6 K, H, W) uint8, mask (6 K, H, W) uint8 in {0, 1, 2}, and the 6 ACs (mm or None).

    Vectorised over chunks of `_CHUNK` frames; a full-size case (840 x 562 x 744) takes ~3.5 s on the
    2-core dev machine.
    """
    frames, ac_mm = _plan_frames(rng, k, height, width)
    t = layout.SWEEPS_PER_CASE * k
    fov = _fov_mask(height, width)
    r, _ = _fan_polar(np.arange(width)[None, :], np.arange(height)[:, None], height, width)
    depth = np.clip((r - _R_IN) / (_R_OUT - _R_IN), 0, 1).astype(np.float32)
    gain = (110.0 * np.exp(-0.9 * depth) * fov).astype(np.float32)  # (H, W): attenuation, 0 outside
    skin = (0.8 * np.exp(-((depth / 0.02) ** 2))).astype(np.float32)  # bright skin line under the probe
    keys = rng.standard_normal((t // _KEY_EVERY + 2, *_FIELD_SHAPE)).astype(np.float32)
    image = np.empty((t, height, width), np.uint8)
    mask = np.zeros((t, height, width), np.uint8)
    for lo in range(0, t, _CHUNK):
        hi = min(t, lo + _CHUNK)
        echo = _tissue(keys, lo, hi, height, width) + skin
        _add_abdomen(echo, mask[lo:hi], frames, lo)
        echo *= _speckle(rng, hi - lo, height, width)
        echo *= gain
        np.clip(echo, 0, 255, out=echo)
        image[lo:hi] = echo.astype(np.uint8)
    return image, mask, ac_mm


def _tissue(keys: np.ndarray, lo: int, hi: int, height: int, width: int) -> np.ndarray:
    """Smooth echogenicity of frames lo..hi-1, (n, H, W) float32 around 0.72, interpolated in time
    between the low-resolution key frames `keys` ((T / 10 + 2, 12, 16) float32) and upsampled."""
    pos = np.arange(lo, hi, dtype=np.float32) / _KEY_EVERY
    i = pos.astype(int)
    w = (pos - i)[:, None, None]
    low = keys[i] * (1 - w) + keys[i + 1] * w
    out = np.empty((hi - lo, height, width), np.float32)
    for n, field in enumerate(low):
        out[n] = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    out *= 0.22
    out += 0.72
    return np.clip(out, 0.2, 1.3, out=out)


def _speckle(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Multiplicative speckle, (n, H, W) float32 of mean ~1: Rayleigh amplitudes drawn at half
    resolution and upsampled, so that the grain spans ~2 pixels."""
    low = np.sqrt(rng.standard_exponential((n, (height + 1) // 2, (width + 1) // 2), dtype=np.float32))
    low *= 2 / math.sqrt(math.pi)  # Rayleigh mean sqrt(pi) / 2 -> 1
    out = np.empty((n, height, width), np.float32)
    for i, field in enumerate(low):
        out[i] = cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def _add_abdomen(echo: np.ndarray, mask: np.ndarray, frames: _Frames, lo: int) -> None:
    """Draw the abdomen into `echo` ((n, H, W) float32, in place) and label `mask` ((n, H, W) uint8,
    in place) for the frames lo..lo+n-1 that show it."""
    n, height, width = echo.shape
    sel = np.nonzero(frames.scale[lo : lo + n] > 0)[0]
    if sel.size == 0:
        return
    f = sel + lo

    def col(v):  # per-frame values broadcast over (H, W)
        return v[f][:, None, None]

    s = col(frames.scale)
    dx = np.arange(width, dtype=np.float32)[None, None, :] - col(frames.cx)
    dy = np.arange(height, dtype=np.float32)[None, :, None] - col(frames.cy)
    cos, sin = np.cos(col(frames.angle)), np.sin(col(frames.angle))
    p = (dx * cos + dy * sin) / (col(frames.a) * s)  # ellipse-normalised coordinates, rho = |(p, q)|
    q = (dy * cos - dx * sin) / (col(frames.b) * s)
    rho = np.hypot(p, q)
    profile = np.where(rho <= 1.0, np.float32(_RIM), np.float32(1.0))  # rim
    profile[rho < _INTERIOR_RHO] = _INTERIOR  # interior
    ps, qs = 0.6 * np.cos(col(frames.spine)), 0.6 * np.sin(col(frames.spine))
    profile[np.hypot(p - ps, q - qs) < 0.13] = 2.8  # spine
    profile[np.hypot(p + 0.6 * ps, q + 0.6 * qs) < 0.2] = 0.12  # stomach
    echo[sel] *= 1 + col(frames.contrast) * (profile - 1)
    mask[sel] = np.where(rho <= 1.0, col(frames.label), 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Output


def put_volume(fs, path: str, volume: np.ndarray, tmp: str, local: bool) -> None:
    """Write a (T, H, W) uint8 array as a zlib-compressed .mha with spacing (0.28, 0.28, 1.0) to
    `path` on `fs`: directly when local, else through a temporary file in `tmp`."""
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((SPACING_MM, SPACING_MM, 1.0))
    if local:
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        sitk.WriteImage(img, path, useCompression=True)
        return
    staged = os.path.join(tmp, posixpath.basename(path))
    sitk.WriteImage(img, staged, useCompression=True)
    try:
        fs.put_file(staged, path)
    finally:
        os.remove(staged)


def put_csv(fs, path: str, rows: list[list[str]], local: bool) -> None:
    """Write the circumferences CSV (header `layout.CSV_COLUMNS`, one row per case) to `path` on `fs`."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(layout.CSV_COLUMNS)
    writer.writerows(rows)
    if local:
        os.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, text.getvalue().encode())
