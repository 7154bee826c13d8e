"""Synthetic archives in the exact ACOUSLIC-AI layout (see `fetaliqa.inputs.layout`), deterministic by seed.

Each case is a stack of 6 sweeps of K frames, T x H x W uint8 (T = 6 K), inside a curvilinear fan
field of view (FOV): a smooth tissue background that changes slowly from frame to frame, depth
attenuation, a bright skin line and multiplicative Rayleigh speckle; 0 outside the fan.

Anatomy passes through the image plane as the probe sweeps: cross-sections ("rings": a bright rim
around an interior) grow then shrink over a run of frames. Some sweeps (2 to 4 per case) pass over the
abdomen at the plane where the AC is measured: a ring with a dark interior, the bright spine and the
darker stomach. The frames near its widest part are labelled 1 (optimal) in the mask, those on its flanks
2 (suboptimal); the mask fills the ellipse. One or two frames beyond each end of that run show the abdomen
off the AC plane and are not labelled. About 3.5-8.5% of the frames of each case are positive (drawn per
case), like the 2.6-8.6% of the challenge data. A sweep's abdominal circumference (AC) is the Ramanujan
perimeter of its largest optimal ellipse times the 0.28 mm spacing; sweeps that miss the abdomen have none.

The other frames are not empty: the label cannot be read off a frame's intensity statistics. Most show
a look-alike ring of the same size and rim (the head, with its midline and thalami, or the abdomen off
the AC plane, with its spine) whose interior is not dark, and most show a dark oval as large as the
abdomen's interior but without a rim (bladder, cysts); bones with their acoustic shadows fall anywhere
outside the rings. A frame is positive by what its bright rim encloses: an untrained model ranks frames
near chance (tests/test_synth.py), while a small CNN learns the task in a few CPU epochs (`jobs.demo`).

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

from fetaliqa.ellipse import ramanujan_perimeter
from fetaliqa.inputs import layout
from fetaliqa.inputs.storage import StorageOptions, filesystem, is_local

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

# Cross-sections ("rings"): a body part that the sweep passes through shows as an ellipse whose size
# follows s(u) = sqrt(1 - (0.8 u)^2) over the passage (u from -1 to 1 while fully in view). Every ring has
# the same size distribution and rim; what it encloses tells which plane it is:
_ABDOMEN_AC = 1  # the abdomen at the AC plane: dark interior, spine, stomach. The only ring labelled.
_ABDOMEN_OFF = 2  # the abdomen above or below that plane: the spine, no stomach
_HEAD = 3  # the fetal head: the midline echo (falx) between two thalami
_RIM = 2.2  # echo gain of the rim (0.78 < rho <= 1 in ellipse-normalised radius)
_INTERIOR_RHO = 0.78
_INTERIOR_AC = 0.3  # gain of the abdomen's interior at the AC plane, and of the rimless dark ovals
_INTERIOR = 0.9  # of any other ring's interior: the brain, the abdomen's organs off the plane
_THALAMUS = 0.5
_BRIGHT = 2.8  # spine, falx and bones
_DARK = 0.1  # the stomach's fluid
_SHADOW = 0.35  # acoustic shadow behind a bone
_SCALE_SLOPE = 0.8  # cross-section s(u) = sqrt(1 - (0.8 u)^2); labelled while |u| < 1, so s >= 0.6
_OPTIMAL_U = 0.4  # frames with |u| <= 0.4 are optimal (1), the rest of the run suboptimal (2)


@dataclass
class _Frames:
    """Per-frame ring parameters of one case, each of shape (T,) float32 (kind, label: uint8)."""

    scale: np.ndarray  # 0 where no ring is visible, else the cross-section's relative size
    kind: np.ndarray  # 0 (no ring), _ABDOMEN_AC, _ABDOMEN_OFF or _HEAD
    label: np.ndarray  # 0, 1 (optimal) or 2 (suboptimal)
    cx: np.ndarray  # ellipse centre (pixels)
    cy: np.ndarray
    a: np.ndarray  # full-size semi-axes (pixels) and rotation (radians)
    b: np.ndarray
    angle: np.ndarray
    spine: np.ndarray  # direction of the spine inside the ellipse (radians)


@dataclass
class _Lookalike:
    """A structure outside the rings, in frames `first` to `last` - 1, labelled never: a dark fluid-filled
    oval (bladder, cyst; centre, semi-axes, rotation in pixels and radians) or a bone, a bright arc across
    the beam with an acoustic shadow behind it (fan radius and angle of its centre, half angle, thickness
    in units of `_fan_polar`)."""

    first: int
    last: int
    bone: bool
    params: tuple[float, ...]


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
    ~6 s (rings in most frames); compressing and writing its two volumes (~176 MB image .mha) takes ~3.5 s more.
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
# What each frame shows


def _plan_frames(rng: np.random.Generator, k: int, height: int, width: int) -> tuple[_Frames, list]:
    """Choose the sweeps that cross the abdomen, fill the per-frame ring parameters, then fill the rest of
    every sweep with passages over look-alike rings.

    Returns the parameters (each (6 K,)) and the AC in mm of each of the 6 sweeps (None if none).
    """
    t = layout.SWEEPS_PER_CASE * k
    frames = _Frames(*(np.zeros(t, np.float32) for _ in range(9)))
    frames.kind, frames.label = np.zeros(t, np.uint8), np.zeros(t, np.uint8)
    positives = max(1, round(rng.uniform(0.035, 0.085) * t))
    crossings = min(int(rng.integers(2, 5)), max(1, positives // 3), layout.SWEEPS_PER_CASE)
    sweeps = sorted(rng.choice(layout.SWEEPS_PER_CASE, crossings, replace=False).tolist())
    ac_mm: list = [None] * layout.SWEEPS_PER_CASE
    for i, sweep in enumerate(sweeps):
        run = min(k, positives // crossings + (i < positives % crossings))
        ac_mm[sweep] = _plan_crossing(rng, frames, sweep * k, k, run, height, width)
    for sweep in range(layout.SWEEPS_PER_CASE):
        _plan_lookalike_rings(rng, frames, sweep * k, k, height, width)
    return frames, ac_mm


def _plan_crossing(rng, frames: _Frames, first: int, k: int, run: int, height: int, width: int) -> float:
    """Place one passage over the abdomen in the sweep starting at frame `first`; return its AC (mm).

    The `run` frames at the AC plane (|u| < 1) are labelled; the one or two frames beyond each end show the
    abdomen off that plane (no stomach, interior not dark) and are not."""
    off_plane = int(math.ceil(run / 2 / _SCALE_SLOPE - run / 2))  # frames on each side
    lo, hi = (off_plane, k - run - off_plane) if k - run >= 2 * off_plane else (0, k - run)
    start = first + int(rng.integers(lo, hi + 1))  # the whole passage stays in the sweep if it can
    a, b, angle, cx, cy, drift = _place_ellipse(rng, height, width)
    idx = np.arange(first, first + k)
    u = (idx - (start + (run - 1) / 2)) / (run / 2)
    seen = np.abs(u) * _SCALE_SLOPE < 1
    labelled = np.abs(u) < 1
    optimal = labelled & (np.abs(u) <= max(_OPTIMAL_U, np.abs(u).min()))
    f = idx[seen]
    frames.scale[f] = np.sqrt(1 - (_SCALE_SLOPE * u[seen]) ** 2)
    frames.kind[f] = np.where(labelled[seen], _ABDOMEN_AC, _ABDOMEN_OFF)
    frames.label[idx[labelled]] = layout.MASK_SUBOPTIMAL
    frames.label[idx[optimal]] = layout.MASK_OPTIMAL
    frames.cx[f], frames.cy[f] = cx + drift[0] * u[seen], cy + drift[1] * u[seen]
    frames.a[f], frames.b[f], frames.angle[f] = a, b, angle
    frames.spine[f] = rng.uniform(0, 2 * np.pi)
    widest = float(frames.scale[idx[optimal]].max())
    return ramanujan_perimeter(a * widest, b * widest) * SPACING_MM


def _plan_lookalike_rings(rng, frames: _Frames, first: int, k: int, height: int, width: int) -> None:
    """Fill the ring-free frames of the sweep starting at `first` with passages (`_back_to_back`) over the
    abdomen off the AC plane or the head, each in full view (|u| < 1, as labelled frames): about 4 frames in
    5 without the labelled abdomen still show a ring of the same size and rim."""
    for start, stop in _back_to_back(rng, np.flatnonzero(frames.kind[first : first + k] == 0) + first, k):
        a, b, angle, cx, cy, drift = _place_ellipse(rng, height, width)
        idx = np.arange(start, stop)
        u = (idx - (start + stop - 1) / 2) / ((stop - start) / 2)
        frames.scale[idx] = np.sqrt(1 - (_SCALE_SLOPE * u) ** 2)
        frames.kind[idx] = _HEAD if rng.random() < 0.5 else _ABDOMEN_OFF
        frames.cx[idx], frames.cy[idx] = cx + drift[0] * u, cy + drift[1] * u
        frames.a[idx], frames.b[idx], frames.angle[idx] = a, b, angle
        frames.spine[idx] = rng.uniform(0, 2 * np.pi)


def _back_to_back(rng: np.random.Generator, free: np.ndarray, k: int) -> Iterator[tuple[int, int]]:
    """Runs of frames (start, stop) over the sorted frame indices `free`, each after a gap of 0 to K/12
    frames, K/10 to K/3 frames long (less where a stretch of consecutive free frames ends)."""
    for stretch in np.split(free, np.flatnonzero(np.diff(free) > 1) + 1) if free.size else []:
        start, end = int(stretch[0]), int(stretch[-1]) + 1
        while (start := start + int(rng.integers(0, max(1, k // 12) + 1))) < end:
            stop = min(end, start + int(rng.integers(max(2, k // 10), max(3, k // 3) + 1)))
            yield start, stop
            start = stop


def _plan_lookalikes(rng: np.random.Generator, frames: _Frames, k: int, height: int, width: int) -> list[_Lookalike]:
    """Dark fluid-filled ovals (bladder, cysts) as large as the abdomen's dark interior, in runs back to back
    over the frames that do not show the labelled abdomen (so that about as many frames hold a dark region
    with or without it), and bones in about one run of frames a sweep; each where it clears the rings."""
    found = []
    size = 0.18 * min(height, width / _REF_ASPECT)  # a typical ring's semi-major axis (pixels)
    for sweep in range(layout.SWEEPS_PER_CASE):
        free = np.flatnonzero(frames.label[sweep * k : (sweep + 1) * k] == 0) + sweep * k
        runs = [(start, stop, False) for start, stop in _back_to_back(rng, free, k)]
        for _ in range(int(rng.poisson(1.0))):
            first = sweep * k + int(rng.integers(0, k))
            length = int(rng.integers(max(1, k // 8), max(2, k // 2) + 1))
            runs.append((first, min((sweep + 1) * k, first + length), True))
        for first, last, bone in runs:
            place = _place_bone if bone else _place_cyst
            for _attempt in range(30):
                params, outline = place(rng, size, height, width)
                if outline is not None and _clears_rings(outline, frames, first, last):
                    found.append(_Lookalike(first, last, bone, params))
                    break
    return found


def _place_cyst(rng, size: float, height: int, width: int):
    """A dark oval: (cx, cy, a, b, angle) in pixels, and its outline (x, y), None where it leaves the fan."""
    a = _INTERIOR_RHO * rng.uniform(0.6, 1.0) * rng.uniform(0.83, 1.17) * size  # as a labelled ring's interior
    b = a * rng.uniform(0.75, 0.92)
    angle, r, theta = rng.uniform(0, np.pi), rng.uniform(_R_IN + 0.08, _R_OUT - 0.15), rng.uniform(-0.8, 0.8)
    cx = (_APEX_X + r * np.sin(theta * _HALF_ANGLE) / _REF_ASPECT) * width - 0.5
    cy = (_APEX_Y + r * np.cos(theta * _HALF_ANGLE)) * height - 0.5
    if not _fits_in_fan(cx, cy, a, b, angle, height, width):
        return None, None
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    outline = (cx + a * np.cos(t) * np.cos(angle) - b * np.sin(t) * np.sin(angle),
               cy + a * np.cos(t) * np.sin(angle) + b * np.sin(t) * np.cos(angle))
    return (cx, cy, a, b, angle), outline


def _place_bone(rng, size: float, height: int, width: int):
    """A bone across the beam: (fan radius, angle, half angle, thickness), and the outline (x, y) of the
    sector it and its shadow cover, down to the bottom of the fan."""
    r0 = rng.uniform(_R_IN + 0.05, _R_OUT - 0.35)
    theta0 = rng.uniform(-0.8, 0.8) * _HALF_ANGLE
    half = rng.uniform(0.4, 0.9) * size / height / r0  # 0.4-0.9 ring radii long
    thickness = 0.012
    rs, ts = np.meshgrid(np.linspace(r0 - thickness, _R_OUT, 16), np.linspace(theta0 - half, theta0 + half, 8))
    outline = ((_APEX_X + rs * np.sin(ts) / _REF_ASPECT) * width - 0.5, (_APEX_Y + rs * np.cos(ts)) * height - 0.5)
    return (r0, theta0, half, thickness), outline


def _clears_rings(outline: tuple[np.ndarray, np.ndarray], frames: _Frames, first: int, last: int) -> bool:
    """Whether the points `outline` lie outside (by 3% of the ring's size) every ring of frames first..last-1."""
    x, y = (np.asarray(v, np.float64).ravel()[:, None] for v in outline)
    f = np.arange(first, last)
    f = f[frames.scale[f] > 0]
    if f.size == 0:
        return True
    s, cos, sin = frames.scale[f], np.cos(frames.angle[f]), np.sin(frames.angle[f])
    dx, dy = x - frames.cx[f], y - frames.cy[f]
    p = (dx * cos + dy * sin) / (frames.a[f] * s)
    q = (dy * cos - dx * sin) / (frames.b[f] * s)
    return bool((np.hypot(p, q) > 1.1).all())


def _place_ellipse(rng: np.random.Generator, height: int, width: int):
    """Semi-axes (pixels), rotation, centre and drift (pixels per unit of u) of a ring in the fan."""
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
    raise RuntimeError(f"cannot place a ring in a {height} x {width} fan")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# Rendering


def _synth_case(rng: np.random.Generator, k: int, height: int, width: int):
    """One case: image (6 K, H, W) uint8, mask (6 K, H, W) uint8 in {0, 1, 2}, and the 6 ACs (mm or None).

    Tissue and speckle vectorised over chunks of `_CHUNK` frames, rings frame by frame within their boxes; a
    full-size case (840 x 562 x 744) takes ~6 s on the 2-core dev machine.
    """
    frames, ac_mm = _plan_frames(rng, k, height, width)
    t = layout.SWEEPS_PER_CASE * k
    fov = _fov_mask(height, width)
    r, theta = _fan_polar(np.arange(width)[None, :], np.arange(height)[:, None], height, width)
    depth = np.clip((r - _R_IN) / (_R_OUT - _R_IN), 0, 1).astype(np.float32)
    gain = (110.0 * np.exp(-0.9 * depth) * fov).astype(np.float32)  # (H, W): attenuation, 0 outside
    skin = (0.8 * np.exp(-((depth / 0.02) ** 2))).astype(np.float32)  # bright skin line under the probe
    keys = rng.standard_normal((t // _KEY_EVERY + 2, *_FIELD_SHAPE)).astype(np.float32)
    lookalikes = _plan_lookalikes(rng, frames, k, height, width)
    image = np.empty((t, height, width), np.uint8)
    mask = np.zeros((t, height, width), np.uint8)
    for lo in range(0, t, _CHUNK):
        hi = min(t, lo + _CHUNK)
        echo = _tissue(keys, lo, hi, height, width) + skin
        _add_rings(echo, mask[lo:hi], frames, lo)
        _add_lookalikes(echo, lookalikes, lo, r, theta)
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


def _add_rings(echo: np.ndarray, mask: np.ndarray, frames: _Frames, lo: int) -> None:
    """Draw the rings into `echo` ((n, H, W) float32, in place) and label the abdomen at the AC plane in
    `mask` ((n, H, W) uint8, in place) for the frames lo..lo+n-1 that show one; each frame within its ring's
    bounding box only (a ring in most frames: the whole frame would cost ~10x more)."""
    n, height, width = echo.shape
    for i in np.flatnonzero(frames.scale[lo : lo + n] > 0):
        f = lo + i
        s, cos, sin = frames.scale[f], math.cos(frames.angle[f]), math.sin(frames.angle[f])
        a, b = frames.a[f] * s, frames.b[f] * s
        half_x, half_y = math.hypot(a * cos, b * sin), math.hypot(a * sin, b * cos)  # the box's half sides
        x0, x1 = max(0, int(frames.cx[f] - half_x)), min(width, int(frames.cx[f] + half_x) + 2)
        y0, y1 = max(0, int(frames.cy[f] - half_y)), min(height, int(frames.cy[f] + half_y) + 2)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - frames.cx[f]
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - frames.cy[f]
        p = (dx * cos + dy * sin) / a  # ellipse-normalised coordinates, rho = |(p, q)|
        q = (dy * cos - dx * sin) / b
        rho = np.hypot(p, q)
        echo[i, y0:y1, x0:x1] *= _ring_profile(p, q, rho, int(frames.kind[f]), float(frames.spine[f]))
        if frames.kind[f] == _ABDOMEN_AC:
            mask[i, y0:y1, x0:x1][rho <= 1.0] = frames.label[f]


def _ring_profile(p: np.ndarray, q: np.ndarray, rho: np.ndarray, kind: int, spine: float) -> np.ndarray:
    """Echo gain of a ring of `kind` at ellipse-normalised coordinates `p` (long axis), `q` and their
    radius `rho` (same shapes), the abdomen's spine in direction `spine` (radians)."""

    def disc(angle, distance, radius):  # a disc of the interior, its centre at (distance, angle)
        return np.hypot(p - distance * math.cos(angle), q - distance * math.sin(angle)) < radius

    interior = rho < _INTERIOR_RHO
    profile = np.where(rho <= 1.0, np.float32(_RIM), np.float32(1.0))
    profile[interior] = _INTERIOR_AC if kind == _ABDOMEN_AC else _INTERIOR
    if kind == _HEAD:
        profile[(np.abs(q) < 0.03) & interior] = _BRIGHT  # falx, along the long axis
        for side in (-math.pi / 2, math.pi / 2):  # thalami, either side of the falx
            profile[disc(side, 0.25, 0.15)] = _THALAMUS
        return profile
    profile[disc(spine, 0.55, 0.13)] = _BRIGHT
    if kind == _ABDOMEN_AC:
        profile[disc(spine + math.pi + 0.5, 0.35, 0.27)] = _DARK  # stomach
    return profile


def _add_lookalikes(echo: np.ndarray, lookalikes: list[_Lookalike], lo: int, r: np.ndarray, theta: np.ndarray) -> None:
    """Draw the look-alikes of frames lo..lo+n-1 into `echo` ((n, H, W) float32, in place); `r`, `theta`:
    (H, W) fan coordinates of the pixels (`_fan_polar`)."""
    n, height, width = echo.shape
    for item in lookalikes:
        rows = slice(max(item.first, lo) - lo, min(item.last, lo + n) - lo)
        if rows.start >= rows.stop:
            continue
        if item.bone:
            r0, theta0, half, thickness = item.params
            beam = np.abs(theta - theta0) < half
            echo[rows] *= np.where(beam & (np.abs(r - r0) < thickness), np.float32(_BRIGHT),
                                   np.where(beam & (r >= r0 + thickness), np.float32(_SHADOW), np.float32(1)))
        else:
            cx, cy, a, b, angle = item.params
            x0, x1 = max(0, int(cx - a)), min(width, int(cx + a) + 2)
            y0, y1 = max(0, int(cy - a)), min(height, int(cy + a) + 2)
            dx, dy = np.arange(x0, x1)[None, :] - cx, np.arange(y0, y1)[:, None] - cy
            rho = np.hypot((dx * np.cos(angle) + dy * np.sin(angle)) / a, (dy * np.cos(angle) - dx * np.sin(angle)) / b)
            echo[rows, y0:y1, x0:x1] *= np.where(rho < 1, np.float32(_INTERIOR_AC), np.float32(1))


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
