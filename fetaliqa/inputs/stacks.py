"""Read stacked images (MetaImage, NIfTI, NRRD), their masks and the circumference csv from any fsspec URL.

Cases are listed by `fetaliqa.inputs.listing` and read, whatever their format, through `fetaliqa.inputs.cases`.

Shapes: an image stack is ``(T, H, W)`` uint8, frame axis first (as SimpleITK's ``GetArrayFromImage``
gives it); a mask stack has the same shape with values in {0, 1, 2}. T is a multiple of
`layout.SWEEPS_PER_CASE`; frame f belongs to sweep ``layout.sweep_of_frame(f, T)``.

Every problem with an input raises the matching `fetaliqa.errors.InputError` subclass, whose one-line
message names the URI as the user gave it (never a temporary copy) and the problem.
Readers given a `max_bytes` compute the decoded size from the header (SimpleITK's `ReadImageInformation`:
size, components, pixel type; no pixel read) and refuse a larger image with `TooLargeError` before decoding.

Formats: anything SimpleITK reads with one of `layout.IMAGE_SUFFIXES` (.mha, .nii.gz, .nii, .nrrd, and
.mhd for local files only: its pixel data sits in a separate file that is not copied from object storage).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from fetaliqa.inputs import layout
from fetaliqa.inputs import metaimage
from fetaliqa.inputs import storage
from fetaliqa.errors import (
    BadDtypeError,
    BadFrameCountError,
    BadMaskValuesError,
    BadShapeError,
    MalformedCsvError,
    MaskMismatchError,
    NotAnImageError,
    TooLargeError,
    TruncatedFileError,
)
from fetaliqa.inputs.storage import StorageOptions

_SUFFIXES_TEXT = ", ".join(layout.IMAGE_SUFFIXES)
_MASK_LABELS = (layout.MASK_BACKGROUND, layout.MASK_OPTIMAL, layout.MASK_SUBOPTIMAL)


@dataclass(frozen=True)
class Stack:
    """A decoded image stack.

    frames: ``(T, H, W)`` uint8, C-contiguous. spacing_mm: ``(row, col)`` pixel spacing in mm from the
    header (None only for a DICOM study whose instances state none, `fetaliqa.inputs.cases`). source: the URI it
    was read from (a DICOM study's: its first sweep's).
    """

    frames: np.ndarray
    spacing_mm: tuple[float, float]
    source: str


# ---------------------------------------------------------------------------------------------- images


def read_image_stack(uri: str, storage_options: StorageOptions = None, max_bytes: int | None = None,
                     buffer: metaimage.DecodeBuffer | None = None) -> Stack:
    """Read one stacked image as a `Stack` of ``(T, H, W)`` uint8 frames.

    `max_bytes`: the most the decoded pixels may take (None: no limit). Their size is computed from the
    header alone (T x H x W x components x bytes a component) before anything is decoded: a header that
    declares more is `TooLargeError`, never an allocation.

    The whole case is decoded at once: the ACOUSLIC .mha files are zlib-compressed MetaImage, whose
    pixel data is one deflate stream, so there is no way to reach the frames of sweep 6 without
    inflating sweeps 1-5 first (SimpleITK's ``SetExtractIndex`` on such a file costs as much as a full
    read). A reader that fetched one sweep per task would decode each case six times; scoring therefore
    reads one case per task and splits it into sweeps afterwards. Remote objects are copied to a local
    temporary file first (SimpleITK reads only local files). MetaImage pixels are decoded by
    `metaimage.read_metaimage` (libdeflate) where it covers the header, else by SimpleITK; the header
    checks above are SimpleITK's either way. Memory: uint8 frames are the decoder's own buffer, not a copy
    (other pixel types: one converted copy); with `buffer`, a MetaImage the fast path reads is decoded into
    it, and uint8 frames are then a view of it, valid until its next use (`metaimage.DecodeBuffer`).

    Pixel rule (applied explicitly; no other conversion happens):
    - uint8: kept as is;
    - floating point with every value in [0, 1]: multiplied by 255 and rounded (a normalised image);
    - floating point with values in [0, 255], or any other integer type with values in [0, 255]:
      rounded (floats) and cast to uint8;
    - anything else (negative values, values above 255, NaN or infinity): `BadDtypeError` naming the
      pixel type and the range found.

    Raises (each naming `uri`): `MissingObjectError`, `EmptyFileError`, `NotAnImageError` (SimpleITK
    cannot parse a header), `TruncatedFileError` (header fine but pixel data short or corrupt),
    `BadShapeError` (not 3-D), `TooLargeError` (decoded size over `max_bytes`), `BadDtypeError` (vector
    pixels such as RGB, or values out of range), `BadFrameCountError` (T not a multiple of
    `layout.SWEEPS_PER_CASE`).
    """
    with storage.local_copy(uri, storage_options) as local:
        reader = read_header(local, uri)
        shape = _stack_shape(reader, uri)
        n_frames = shape[0]
        _check_decoded_size(reader, uri, max_bytes)
        _check_scalar(reader, uri)
        if n_frames % layout.SWEEPS_PER_CASE:
            raise BadFrameCountError(
                uri, f"{n_frames} frames is not a multiple of {layout.SWEEPS_PER_CASE} sweeps"
            )
        fast = metaimage.read_metaimage(local, buffer) if layout.image_suffix(uri) in metaimage.SUFFIXES else None
        if fast is not None and fast.pixels.shape == shape:  # None: a file the fast path leaves to SimpleITK
            frames = _array_to_uint8(fast.pixels, uri)
            return Stack(frames=frames, spacing_mm=(fast.spacing[1], fast.spacing[0]), source=uri)
        image = _read_pixels(reader, local, uri)
    spacing = image.GetSpacing()
    frames = _to_uint8(image, uri)
    return Stack(frames=frames, spacing_mm=(float(spacing[1]), float(spacing[0])), source=uri)


# The headers of the stacked formats come first and are short (a MetaImage header is ~400 bytes, NIfTI's
# 348); 64 KiB covers any with long metadata, so the header costs one small ranged GET, not the image.
HEADER_BYTES = 1 << 16


def read_image_geometry(uri: str, storage_options: StorageOptions = None
                        ) -> tuple[tuple[int, int, int], tuple[float, float]]:
    """(T, H, W) and (row, col) spacing in mm of a stacked image, from its header alone: the first
    `HEADER_BYTES` of a remote object (the whole object only when its header is longer). Raises the
    storage errors, `NotAnImageError`/`TruncatedFileError` for an unreadable header and `BadShapeError`
    for an image that is not 3-D, each naming `uri`."""
    try:
        with storage.local_copy(uri, storage_options, max_bytes=HEADER_BYTES) as local:
            reader = read_header(local, uri)
    except TruncatedFileError:
        with storage.local_copy(uri, storage_options) as local:
            reader = read_header(local, uri)
    spacing = reader.GetSpacing()
    return _stack_shape(reader, uri), (float(spacing[1]), float(spacing[0]))


def read_mask_stack(uri: str, image: Stack | None = None, storage_options: StorageOptions = None,
                    max_bytes: int | None = None) -> np.ndarray:
    """Read the mask stack of `image` (or a mask alone when `image` is None): ``(T, H, W)`` uint8, {0, 1, 2}.

    Any integer or floating pixel type is accepted when every value is one of 0, 1, 2. Raises (each
    naming `uri`): `MaskMismatchError` when the mask's shape differs from ``image.frames.shape`` (checked
    from the header, before decoding), `BadMaskValuesError` listing values outside {0, 1, 2},
    `BadDtypeError` for vector pixels, and the read errors of `read_image_stack` (`TooLargeError` with
    `max_bytes` as there).
    """
    with storage.local_copy(uri, storage_options) as local:
        reader = read_header(local, uri)
        shape = tuple(reader.GetSize())[::-1]
        if image is not None and shape != image.frames.shape:
            raise MaskMismatchError(
                uri,
                f"mask shape {_shape_text(shape)} differs from image shape "
                f"{_shape_text(image.frames.shape)} ({image.source})",
            )
        _check_decoded_size(reader, uri, max_bytes)
        _check_scalar(reader, uri)
        mask_image = _read_pixels(reader, local, uri)
    if mask_image.GetPixelID() == sitk.sitkUInt8:
        mask = np.asarray(_PixelBuffer(mask_image))
        # max() needs no temporary; bincount would widen 351M voxels to int64 first (2.8 GB).
        bad = np.unique(mask[mask > layout.MASK_SUBOPTIMAL]).tolist() if mask.max(initial=0) > layout.MASK_SUBOPTIMAL else []
        if bad:
            raise BadMaskValuesError(uri, f"mask values outside {{0, 1, 2}}: {_list_text(bad)}")
        return mask
    view = sitk.GetArrayViewFromImage(mask_image)
    values = np.unique(view)  # other pixel types are rare; sorting them is acceptable
    bad = [v.item() for v in values if v not in _MASK_LABELS]
    if bad:
        raise BadMaskValuesError(
            uri, f"mask values outside {{0, 1, 2}}: {_list_text(bad)} (pixel type {view.dtype})"
        )
    return view.astype(np.uint8)


class _PixelBuffer:
    """Owner of a SimpleITK image whose pixels a numpy array uses in place.

    ``np.asarray(_PixelBuffer(image))`` is the ``(T, H, W)`` array over the image's own buffer, with
    this object (and so the image) kept alive as the array's base: no copy of the 351 MB stack is made.
    SimpleITK marks its views read-only to protect images shared with other code; the image here is
    private to the reader (and made unique by `GetArrayViewFromImage`), so the array is writable.
    """

    def __init__(self, image: sitk.Image):
        self._image = image
        interface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)
        interface["data"] = (interface["data"][0], False)  # (pointer, read-only flag)
        self.__array_interface__ = interface


def read_header(local: str, uri: str) -> sitk.ImageFileReader:
    """The header of the image at local path `local` (`ReadImageInformation`: no pixel decoded); `TruncatedFileError`
    or `NotAnImageError` naming `uri` when SimpleITK cannot read it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(local)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        if _has_image_magic(local, uri):
            raise TruncatedFileError(uri, "truncated or corrupt image header") from err
        raise NotAnImageError(
            uri, f"not an image SimpleITK can read (expected one of {_SUFFIXES_TEXT})"
        ) from err
    return reader


def _stack_shape(reader: sitk.ImageFileReader, uri: str) -> tuple[int, int, int]:
    """(T, H, W) from a read header; `BadShapeError` naming `uri` unless the image is 3-D."""
    size = reader.GetSize()  # (W, H, T): SimpleITK order, fastest axis first
    if len(size) != 3:
        raise BadShapeError(uri, f"{len(size)}-D image of shape {_shape_text(size[::-1])}; "
                                 "expected a 3-D stack of frames (T x H x W)")
    return tuple(size[::-1])


def decoded_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes SimpleITK allocates to decode the image whose header `reader` has read (`ReadImageInformation`)."""
    return math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * _component_bytes(reader)


def _component_bytes(reader: sitk.ImageFileReader) -> int:
    return sitk.Image([1, 1], reader.GetPixelID(), 1).GetSizeOfPixelComponent()  # of a 1-pixel image


def _check_decoded_size(reader: sitk.ImageFileReader, uri: str, max_bytes: int | None) -> None:
    """`TooLargeError` naming `uri` when the decoded pixels would take more than `max_bytes` (None: no limit)."""
    n_bytes = decoded_bytes(reader)
    if max_bytes is None or n_bytes <= max_bytes:
        return
    shape = [str(n) for n in reversed(reader.GetSize())]  # (T, H, W) for a stack
    if len(shape) == 3:
        shape[0] += " frames"
    components = reader.GetNumberOfComponents()
    component = _component_bytes(reader)
    dims = " x ".join(shape + [f"{components} components"] * (components > 1)
                      + [f"{component} byte{'s' * (component > 1)}"])
    raise TooLargeError.over_limit(uri, n_bytes, dims, max_bytes)


def _read_pixels(reader: sitk.ImageFileReader, local: str, uri: str) -> sitk.Image:
    """Decode the pixel data; `TruncatedFileError` when it is short or corrupt."""
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise TruncatedFileError(uri, "truncated or corrupt image data") from err
    # ITK's NIfTI reader zero-fills a short file without complaint: check those files ourselves.
    suffix = layout.image_suffix(uri) or ""
    if suffix.startswith(".nii"):
        pixel_bytes = image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
        if _nifti_is_short(local, suffix, math.prod(image.GetSize()) * pixel_bytes):
            raise TruncatedFileError(
                uri, "truncated or corrupt image data (NIfTI file shorter than its header says)"
            )
    return image


def _nifti_is_short(local: str, suffix: str, n_bytes: int) -> bool:
    """Whether a NIfTI file holds fewer than header + `n_bytes` bytes (once inflated, for .nii.gz).

    For .nii.gz the gzip trailer's length field is compared first (free); only when it disagrees
    (a cut file, or a file of several gzip members) is the whole stream inflated once more to count.
    """
    opener = gzip.open if suffix == ".nii.gz" else open
    try:
        with opener(local, "rb") as f:
            head = f.read(352)
    except (OSError, EOFError, zlib.error):
        return True
    vox_offset = _nifti_vox_offset(head)
    expected = (348 if vox_offset is None else vox_offset) + n_bytes  # 348: the smallest NIfTI header
    if suffix == ".nii":
        return os.path.getsize(local) < expected
    with open(local, "rb") as f:
        f.seek(-4, os.SEEK_END)
        trailer_size = int.from_bytes(f.read(4), "little")  # ISIZE: inflated length mod 2**32
    if vox_offset is not None and trailer_size == expected % 2**32:
        return False
    total = 0
    try:
        with gzip.open(local, "rb") as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):  # cut stream, bad CRC or bad member header
        return True
    return total < expected


def _nifti_vox_offset(head: bytes) -> int | None:
    """Byte offset of the pixel data from a NIfTI-1 or NIfTI-2 header (either byte order), else None."""
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 112:
            return int(struct.unpack(order + "f", head[108:112])[0])
        if size == 540 and len(head) >= 176:
            return struct.unpack(order + "q", head[168:176])[0]
    return None


def _has_image_magic(local: str, uri: str) -> bool:
    """Whether the file starts like the format its suffix names (so a failed header means truncation)."""
    with open(local, "rb") as f:
        head = f.read(352)
    suffix = layout.image_suffix(uri)
    if suffix in (".mha", ".mhd"):
        return head.lstrip().startswith((b"ObjectType", b"NDims"))
    if suffix == ".nrrd":
        return head.startswith(b"NRRD")
    if suffix == ".nii.gz":
        return head.startswith(b"\x1f\x8b")
    if suffix == ".nii":
        return _nifti_vox_offset(head) is not None
    return False


def _check_scalar(reader: sitk.ImageFileReader, uri: str) -> None:
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise BadDtypeError(
            uri,
            f"{components} components per pixel ({sitk.GetPixelIDValueAsString(reader.GetPixelID())}); "
            "expected one gray value per pixel",
        )


def _to_uint8(image: sitk.Image, uri: str) -> np.ndarray:
    """Frames of `image` as ``(T, H, W)`` uint8 by the pixel rule of `read_image_stack`.

    uint8 pixels: SimpleITK's buffer itself (`_PixelBuffer`); other types: one converted array.
    """
    if image.GetPixelID() == sitk.sitkUInt8:
        return np.asarray(_PixelBuffer(image))  # no copy at all
    return _array_to_uint8(sitk.GetArrayViewFromImage(image), uri)  # a view: no copy; valid while `image` lives


def _array_to_uint8(view: np.ndarray, uri: str) -> np.ndarray:
    """``(T, H, W)`` pixels of a real type as uint8 by `read_image_stack`'s pixel rule (uint8: `view` itself)."""
    if view.dtype == np.uint8:
        return view
    lo, hi = view.min().item(), view.max().item()  # NaN propagates through min/max
    is_float = np.issubdtype(view.dtype, np.floating)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0 and hi <= 255):
        raise BadDtypeError(
            uri,
            f"pixel type {view.dtype} with values in [{lo:g}, {hi:g}]; "
            "expected uint8, or values in [0, 255] (floats also [0, 1])",
        )
    scale = 255.0 if is_float and hi <= 1.0 else 1.0
    out = np.empty(view.shape, np.uint8)
    for t in range(view.shape[0]):  # frame by frame: float temporaries stay one frame large
        frame = view[t] * scale if scale != 1.0 else view[t]
        out[t] = np.rint(frame) if is_float else frame
    return out


def _shape_text(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _list_text(values: list, limit: int = 10) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


# ---------------------------------------------------------------------------------------------- csv


def read_circumferences(
    root_url: str, storage_options: StorageOptions = None
) -> dict[str, list[float | None]]:
    """Per-sweep abdominal circumferences: case id -> 6 values in mm (None where a sweep has none), in the
    csv's row order (the paper's split depends on it).

    `root_url` is an ACOUSLIC root (the csv is `layout.CIRCUMFERENCES_CSV` below it) or the csv itself.
    The header must hold every column of `layout.CSV_COLUMNS` (in any order; other columns are
    ignored). An empty or "nan" cell means no AC. Raises `MalformedCsvError` naming the file and the
    line for a wrong header, a row with the wrong number of fields, an empty or repeated uuid, or an AC
    cell that is not a finite non-negative number; `MissingObjectError`/`EmptyFileError` as usual.
    """
    url = root_url if root_url.lower().endswith(".csv") else storage.join(root_url, layout.CIRCUMFERENCES_CSV)
    with storage.local_copy(url, storage_options) as local:
        with open(local, "rb") as f:
            data = f.read()  # a few hundred rows
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise MalformedCsvError(url, f"line {line}: not UTF-8 text") from err
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        return _parse_circumferences(url, rows)
    except csv.Error as err:
        raise MalformedCsvError(url, f"line {rows.line_num}: not a valid csv ({err})") from err


def _parse_circumferences(url: str, rows) -> dict[str, list[float | None]]:
    header = [name.strip() for name in next(rows, [])]
    missing = [c for c in layout.CSV_COLUMNS if c not in header]
    if missing:
        found = ", ".join(header) or "nothing"
        raise MalformedCsvError(url, f"line 1: header lacks column(s) {', '.join(missing)}; found {found}")
    uuid_at = header.index("uuid")
    ac_at = [header.index(f"sweep_{i}_ac_mm") for i in range(1, layout.SWEEPS_PER_CASE + 1)]
    result: dict[str, list[float | None]] = {}
    first_line: dict[str, int] = {}
    for row in rows:
        line = rows.line_num
        if not row:
            continue  # blank line
        if len(row) != len(header):
            raise MalformedCsvError(url, f"line {line}: expected {len(header)} fields, found {len(row)}")
        case_id = row[uuid_at].strip()
        if not case_id:
            raise MalformedCsvError(url, f"line {line}: empty uuid")
        if case_id in result:
            raise MalformedCsvError(url, f"line {line}: uuid {case_id} repeats line {first_line[case_id]}")
        result[case_id] = [_ac_value(url, line, header[i], row[i]) for i in ac_at]
        first_line[case_id] = line
    return result


def _ac_value(url: str, line: int, column: str, cell: str) -> float | None:
    text = cell.strip()
    if not text or text.lower() == "nan":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise MalformedCsvError(url, f"line {line}: column {column}: {text!r} is not a circumference in mm")
    return value
