"""Read a listed case (`fetaliqa.inputs.listing.CaseRef`) whatever its format: its frames, its geometry, its mask.

One reader per format underneath: `fetaliqa.inputs.stacks` for stacked images (SimpleITK), `fetaliqa.inputs.dicom`
for DICOM instances (pydicom, frames cropped to the ultrasound region). A DICOM study is its instances' frames
concatenated in sweep order: ``(T, h, w)`` with T the sum of its sweeps' frames and (h, w) the cropped region, which
is the geometry its mask has in the ACOUSLIC layout (what `fetaliqa synth --format dicom` writes). Train, evaluate
and export read cases through here; `score` reads a stacked case here too, and a study instance by instance with
the same `read_dicom_instance` (so that one bad sweep does not cost the study its other sweeps).
"""

from __future__ import annotations

import numpy as np

from fetaliqa.errors import BadFrameCountError, BadShapeError, MissingMaskError
from fetaliqa.inputs import layout
from fetaliqa.inputs.dicom import read_dicom_header, read_dicom_instance
from fetaliqa.inputs.listing import CaseRef
from fetaliqa.inputs.metaimage import DecodeBuffer
from fetaliqa.inputs.stacks import Stack, read_image_geometry, read_image_stack, read_mask_stack
from fetaliqa.inputs.storage import StorageOptions

Geometry = tuple[tuple[int, int, int], tuple[float, float] | None]  # ((T, H, W), (row, col) mm or None)


def read_case_frames(case: CaseRef, storage_options: StorageOptions = None, max_bytes: int | None = None,
                     buffer: DecodeBuffer | None = None) -> Stack:
    """The case's native frames as a `Stack`: ``(T, H, W)`` uint8 and (row, col) spacing in mm (None for a study
    whose instances state none). `max_bytes` bounds a stacked image's decoded size, or each instance's. `buffer`:
    memory a caller reuses case after case for stacked images (see `read_image_stack`).

    A study must be `layout.SWEEPS_PER_CASE` sweeps of one frame count and one cropped size (the masks, the
    circumference csv and the sweep of a frame all assume it): else `BadFrameCountError` / `BadShapeError` naming
    the study's first sweep. Otherwise raises the readers' `InputError`s, each naming the file.
    """
    if case.instances is None:
        return read_image_stack(case.source, storage_options, max_bytes, buffer)
    instances = [read_dicom_instance(uri, storage_options, max_bytes) for uri in case.instances]
    _check_sweeps(case, [i.frames.shape for i in instances])
    return Stack(frames=np.concatenate([i.frames for i in instances]), spacing_mm=instances[0].spacing_mm,
                 source=case.source)


def case_geometry(case: CaseRef, storage_options: StorageOptions = None) -> Geometry:
    """(T, H, W) and spacing of the frames `read_case_frames` returns, from headers alone (`file_geometry` of the
    stacked image, or of each instance of a study). Raises as `read_case_frames` does for a header."""
    if case.instances is None:
        return file_geometry(case.source, storage_options)
    geometries = [file_geometry(uri, storage_options) for uri in case.instances]
    shapes = [shape for shape, _ in geometries]
    _check_sweeps(case, shapes)
    return (sum(s[0] for s in shapes), *shapes[0][1:]), geometries[0][1]


def file_geometry(uri: str, storage_options: StorageOptions = None) -> Geometry:
    """(T, H, W) and spacing of one file's frames from its header alone, no pixel decoded: a stacked image's
    (`stacks.read_image_geometry`, SimpleITK), or a DICOM instance's cropped to its ultrasound region
    (`dicom.read_dicom_header`). The format is told by the name, as the lister tells it."""
    if layout.image_suffix(uri):
        return read_image_geometry(uri, storage_options)
    header = read_dicom_header(uri, storage_options)
    return (header.frames, *header.cropped_size()), header.spacing_mm


def read_case(case: CaseRef, storage_options: StorageOptions = None,
              with_mask: bool = False) -> tuple[Stack, np.ndarray | None]:
    """The case's frames (`read_case_frames`) and, when `with_mask`, its mask stack (else None): ``(T, H, W)``
    uint8 in {0, 1, 2}, of the frames' shape. With `with_mask`, raises `MissingMaskError` for a case without a mask
    before anything is decoded, and `MaskMismatchError` naming the mask, the image and both shapes when they
    differ (checked from the mask's header, before decoding it)."""
    if with_mask and case.mask_uri is None:
        raise MissingMaskError(case.source, f"no mask for case {case.case_id!r} (expected one in {layout.MASKS_DIR}/)")
    stack = read_case_frames(case, storage_options)
    mask = read_mask_stack(case.mask_uri, stack, storage_options) if with_mask else None
    return stack, mask


def _check_sweeps(case: CaseRef, shapes: list[tuple[int, int, int]]) -> None:
    """A study's sweep shapes ``(frames, h, w)``, in order: six, of one frame count and one size."""
    if len(shapes) != layout.SWEEPS_PER_CASE or len({s[0] for s in shapes}) != 1:
        raise BadFrameCountError(case.source, f"study {case.case_id} has sweeps of {', '.join(str(s[0]) for s in shapes)} "
                                              f"frames; expected {layout.SWEEPS_PER_CASE} sweeps of one length")
    if len({s[1:] for s in shapes}) != 1:
        sizes = ", ".join(f"{h} x {w}" for _, h, w in shapes)
        raise BadShapeError(case.source, f"study {case.case_id} has sweeps of cropped sizes {sizes}; "
                                         "expected one size for the whole study")
