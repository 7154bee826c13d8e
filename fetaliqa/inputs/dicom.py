"""Read ultrasound DICOM instances (one multi-frame instance per sweep) as gray frames cropped to the image.

Shapes: an instance's frames are ``(T, h, w)`` uint8, frame axis first, where ``h x w`` is the imaging
region (the largest 2-D B-mode region of the Sequence of Ultrasound Regions), not the whole stored frame:
burned-in text and bars around it never reach the model. Spacing is ``(row, col)`` in mm, or None.

Decoding is pydicom's, with the pylibjpeg plugins (libjpeg: JPEG Baseline/Extended/Lossless and JPEG-LS;
openjpeg: JPEG 2000; rle: RLE Lossless) and pyjpegls as decoders: pure wheels, no system library, and
pydicom exposes what scoring needs that SimpleITK/GDCM hides or handles its own way: the nested Sequence of
Ultrasound Regions, a header read that stops before the pixel data (`read_dicom_header`), colour samples as
stored (YCbCr is not turned into RGB and back) and decoding one frame at a time, so an instance is
cropped and turned gray frame by frame and never held whole in colour.

Gray (the frames of ACOUSLIC are single-channel luma), by photometric interpretation:
- MONOCHROME2: the stored value; MONOCHROME1: 255 - value (white is 0 there);
- RGB: ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B, rounded, in PIL's fixed point
  ``(19595 R + 38470 G + 7471 B + 32768) >> 16`` (the same as PIL's ``convert("L")``; exact for R = G = B);
- YBR_FULL, YBR_FULL_422: the Y sample as stored: DICOM defines it as that same luma (PS3.3 C.7.6.3.1.2),
  so it is taken directly rather than converted to RGB (where clipping would alter it) and back;
- PALETTE COLOR: the luma of the palette's RGB entry (16-bit entries scaled to 8 bits, v / 257 rounded).
Samples must be 8-bit unsigned (palette indices 8 or 16 bits); others raise `BadDtypeError`.

Checked before anything is decoded (`read_dicom_header` and `read_dicom_instance` alike):
- the StudyInstanceUID obeys the UI rules of PS3.5 9.1 (it becomes a case id, and so a path): `BadUidError`;
- a DICOMDIR (Media Storage Directory Storage, the index of a file set) is no instance: `DicomDirectoryError`;
- with a limit, the decoded size NumberOfFrames x Rows x Columns x SamplesPerPixel x BitsAllocated / 8 from the
  header: `TooLargeError` (`read_dicom_instance`'s `max_bytes`, `InstanceHeader.check_size`).
Truncation is found from where parsing stopped, not from pydicom's warnings (pydicom warns and drops an
element the file ends inside; catching that warning changes process-global filters, and headers are read from
many threads at once): a parse that stops before the end of the file, other than at the pixel data of a
header read, is a `TruncatedFileError`.

Every problem raises an `fetaliqa.errors.InputError` subclass whose one-line message names the URI.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass, field, replace

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MediaStorageDirectoryStorage,
    RLELossless,
    UID,
)

from fetaliqa.inputs import storage
from fetaliqa.errors import (
    BadDtypeError,
    BadUidError,
    DicomDirectoryError,
    DicomHeaderError,
    EmptyFileError,
    InputError,
    NoPixelDataError,
    NotDicomError,
    TooLargeError,
    TruncatedFileError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
)
from fetaliqa.inputs.storage import StorageOptions

DICOM_SUFFIXES = (".dcm", ".dicom")
DICOMDIR_NAME = "DICOMDIR"  # the file-set index of PS3.10 8.6 (any case on disk)
MAGIC_OFFSET, MAGIC = 128, b"DICM"  # the 128-byte preamble, then 'DICM' (PS3.10 7.1)
# A UID (PS3.5 9.1): components of digits separated by single dots, no leading zero in a component of more than
# one digit, at most 64 characters. pydicom's `UID.is_valid` uses `re.match` with '$', which lets a trailing
# newline through: a case id, and a path, must not hold one.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64
_DATE = re.compile(r"[0-9]{8}")  # DA, YYYYMMDD (PS3.5 6.2); strptime alone would take "2026 1 1"
# Where a header read stops: the Pixel Data tags, (7FE0,0010) and the float ones (7FE0,0008), (7FE0,0009),
# little endian as every supported transfer syntax stores them.
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")

# A header read fetches blocks of this size: one ranged GET holds an ultrasound header (a few KB, the
# Sequence of Ultrasound Regions included), where fsspec's default block (5 MB on S3) would fetch frames too.
_HEADER_BLOCK = 1 << 18

SUPPORTED_TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
)
# The fastest installed decoder of each compressed syntax (pydicom would otherwise take the first that
# loads): libjpeg-turbo through Pillow decodes a 744 x 562 JPEG Baseline frame ~50x faster than the reference
# libjpeg of pylibjpeg-libjpeg; CharLS (pyjpegls) does JPEG-LS; the others have one good choice. Measured in
# benchmarks/dicom_decode.py.
_DECODER = {JPEGBaseline8Bit: "pillow", JPEGExtended12Bit: "pylibjpeg", JPEGLossless: "pylibjpeg",
            JPEGLosslessSV1: "pylibjpeg", JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls",
            JPEG2000Lossless: "pylibjpeg", JPEG2000: "pylibjpeg", RLELossless: "pylibjpeg"}
SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")

# Sequence of Ultrasound Regions codes (PS3.3 C.8.5.5.1): spatial format 1 = 2-D, data type 1 = tissue
# (B-mode), physical units 3 = cm.
_SPATIAL_2D, _DATA_TISSUE, _UNITS_CM = 1, 1, 3
_UNIT_NAMES = {0: "none", 1: "percent", 2: "dB", 3: "cm", 4: "seconds", 5: "hertz", 6: "dB/seconds",
               7: "cm/sec", 8: "cm2", 9: "cm2/sec", 10: "cm3", 11: "cm3/sec", 12: "degrees"}


@dataclass(frozen=True)
class InstanceHeader:
    """What a listing needs of one instance, read without its pixel data.

    acquisition: AcquisitionDateTime, else AcquisitionDate + AcquisitionTime, else "" (DICOM DT text, which
    sorts in time order). frames: NumberOfFrames (1 when absent). samples: SamplesPerPixel (1 when absent);
    bits_allocated: BitsAllocated (8 when absent). The study's context, None when absent or empty: study_date
    (StudyDate as ``YYYY-MM-DD``; None when not a valid ``YYYYMMDD`` date), institution (InstitutionName),
    station (StationName), manufacturer (Manufacturer), device_model (ManufacturerModelName). Operator names
    (OperatorsName, PerformingPhysicianName) are never read.
    """

    source: str
    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: int | None
    instance_number: int | None
    acquisition: str
    frames: int
    rows: int
    columns: int
    samples: int = 1
    bits_allocated: int = 8
    region: tuple[int, int, int, int] | None = None  # `imaging_region`'s crop box; None: the whole frame
    spacing_mm: tuple[float, float] | None = None  # `imaging_region`'s (row, col) spacing
    study_date: str | None = None
    institution: str | None = None
    station: str | None = None
    manufacturer: str | None = None
    device_model: str | None = None

    def cropped_size(self) -> tuple[int, int]:
        """(h, w) of the frames once cropped to `region`: what `read_dicom_instance` returns."""
        top, left, bottom, right = self.region or (0, 0, self.rows, self.columns)
        return bottom - top, right - left

    def decoded_bytes(self) -> int:
        """Bytes of the instance's stored frames once decoded: frames x rows x columns x samples x bits / 8."""
        return -(-self.frames * self.rows * self.columns * self.samples * self.bits_allocated // 8)

    def check_size(self, max_bytes: int | None) -> None:
        """`TooLargeError` naming the instance when `decoded_bytes` is over `max_bytes` (None: no limit)."""
        n_bytes = self.decoded_bytes()
        if max_bytes is not None and n_bytes > max_bytes:
            sample = self.bits_allocated / 8
            dims = (f"{self.frames} frames x {self.rows} x {self.columns}"
                    + (f" x {self.samples} samples" if self.samples > 1 else "")
                    + f" x {sample:g} byte{'s' * (sample > 1)}")
            raise TooLargeError.over_limit(self.source, n_bytes, dims, max_bytes)

    def sort_key(self) -> tuple:
        """Sweep order within a study: SeriesNumber, InstanceNumber, acquisition time (absent last), then
        the SOP Instance UID so that the order is total."""
        missing = 2**31
        return (missing if self.series_number is None else self.series_number,
                missing if self.instance_number is None else self.instance_number,
                self.acquisition or "~", self.sop_uid)


@dataclass(frozen=True)
class Instance:
    """A decoded instance.

    frames: ``(T, h, w)`` uint8 gray, cropped to `region`. region: ``(top, left, bottom, right)`` of the crop
    in stored pixels, half-open. spacing_mm: ``(row, col)`` in mm, or None (then `spacing_note` says why).
    notes: what else a user should know (e.g. no imaging region found, so frames are not cropped).
    """

    header: InstanceHeader
    frames: np.ndarray
    region: tuple[int, int, int, int]
    spacing_mm: tuple[float, float] | None
    spacing_note: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------- headers


def is_dicom_candidate(name: str) -> bool:
    """Whether a file name may be DICOM, to be confirmed by its 'DICM' marker: a `DICOM_SUFFIXES` name, a name
    without suffix (``IM000001``), or one whose last dotted part is a number (a UID such as ``1.2.840.1.7``).
    Other names (``notes.txt``, ``scores.csv``) are not DICOM candidates."""
    lower = name.lower()
    if lower.endswith(DICOM_SUFFIXES):
        return True
    stem, dot, suffix = lower.rpartition(".")
    return not dot or not stem or suffix.isdigit()


def is_dicomdir_name(name: str) -> bool:
    """Whether a file name is that of a DICOMDIR (any case): a listing skips it unread."""
    return name.upper() == DICOMDIR_NAME


def is_valid_uid(text: str) -> bool:
    """Whether `text` is a UID by the UI rules of PS3.5 9.1 (see `_UID`)."""
    return len(text) <= MAX_UID_LENGTH and _UID.fullmatch(text) is not None


def has_dicom_magic(head: bytes) -> bool:
    """Whether `head` (a file's first 132 bytes or more) holds 'DICM' after the 128-byte preamble."""
    return head[MAGIC_OFFSET:MAGIC_OFFSET + len(MAGIC)] == MAGIC


def read_dicom_header(uri: str, storage_options: StorageOptions = None) -> InstanceHeader:
    """The header of one instance, read up to its pixel data and no further.

    Remote objects are read through fsspec's buffered file, so a header costs one or two ranged GETs, not the
    object (a deflated file is the exception: its whole dataset is one deflate stream). Raises
    `MissingObjectError`, `EmptyFileError`, `NotDicomError`, `TruncatedFileError`, `DicomHeaderError`,
    `DicomDirectoryError`, `BadUidError`, each naming `uri`.
    """
    fs, path = storage.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb", block_size=_HEADER_BLOCK) as f:
            ds = _parse(f, uri, stop_before_pixels=True)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - every filesystem raises its own types
        raise storage.describe_io_error(uri, err) from err
    return _header(ds, uri)


def _parse(f, uri: str, stop_before_pixels: bool) -> Dataset:
    """Parse an open DICOM file; `NotDicomError` without the 'DICM' marker, `TruncatedFileError` when the
    file ends inside its data, `DicomHeaderError` when pydicom cannot parse it."""
    head = f.read(MAGIC_OFFSET + len(MAGIC))
    if not head:
        raise EmptyFileError(uri, "file is empty")
    if not has_dicom_magic(head):
        raise NotDicomError(uri, f"not DICOM (no 'DICM' marker at byte {MAGIC_OFFSET})")
    f.seek(0)
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)
    except (EOFError, OSError) as err:
        raise TruncatedFileError(uri, f"truncated DICOM file ({err})") from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a corrupt header
        raise DicomHeaderError(uri, f"corrupt DICOM header ({type(err).__name__}: {err})") from err
    _check_parsed_whole(f, uri, stop_before_pixels)
    return ds


def _check_parsed_whole(f, uri: str, stop_before_pixels: bool) -> None:
    """`TruncatedFileError` unless pydicom's parse of `f` stopped at the end of the file, or (header reads) at the
    pixel data. Where the file ends inside an element of undefined length (an encapsulated Pixel Data, a
    sequence), pydicom warns, drops that element and leaves `f` at its value: 12 bytes after its tag."""
    stopped = f.tell()
    end = f.seek(0, os.SEEK_END)
    if stopped >= end:
        return
    f.seek(max(stopped - 12, 0))
    around = f.read(16)  # the tag of the element dropped, then the 4 bytes where the parse stopped
    if stop_before_pixels and around[-4:] in _PIXEL_TAGS:
        return
    if around[:4] in _PIXEL_TAGS:
        raise TruncatedFileError(uri, "truncated pixel data (the file ends before its last fragment)")
    raise TruncatedFileError(uri, f"truncated DICOM file (parsing stopped at byte {stopped:,} of {end:,})")


def _header(ds: Dataset, uri: str) -> InstanceHeader:
    sop_class = getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    if sop_class == MediaStorageDirectoryStorage:
        raise DicomDirectoryError(uri, "a DICOMDIR (Media Storage Directory Storage): a file-set index, not an image")
    missing = [k for k in ("StudyInstanceUID", "SOPInstanceUID", "Rows", "Columns") if not ds.get(k)]
    if missing:
        raise DicomHeaderError(uri, f"DICOM header lacks {', '.join(missing)}")
    study_uid = ds.StudyInstanceUID
    if not isinstance(study_uid, str) or not is_valid_uid(study_uid):
        shown = repr(study_uid if isinstance(study_uid, str) else list(study_uid))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise BadUidError(uri, f"StudyInstanceUID {shown} is not a DICOM UID (digits in components separated by "
                               f"single dots, no leading zeros, at most {MAX_UID_LENGTH} characters)")
    try:
        header = InstanceHeader(
            source=uri, study_uid=str(study_uid), series_uid=str(ds.get("SeriesInstanceUID", "")),
            sop_uid=str(ds.SOPInstanceUID), series_number=_int_or_none(ds.get("SeriesNumber")),
            instance_number=_int_or_none(ds.get("InstanceNumber")), acquisition=_acquisition(ds),
            frames=int(ds.get("NumberOfFrames") or 1), rows=int(ds.Rows), columns=int(ds.Columns),
            samples=int(ds.get("SamplesPerPixel") or 1), bits_allocated=int(ds.get("BitsAllocated") or 8),
            study_date=_study_date(ds.get("StudyDate")), institution=_text(ds.get("InstitutionName")),
            station=_text(ds.get("StationName")), manufacturer=_text(ds.get("Manufacturer")),
            device_model=_text(ds.get("ManufacturerModelName")))
        region, spacing, _, _ = imaging_region(ds)
    except (TypeError, ValueError) as err:
        raise DicomHeaderError(uri, f"invalid DICOM header value ({err})") from err
    counts = {"NumberOfFrames": header.frames, "Rows": header.rows, "Columns": header.columns,
              "SamplesPerPixel": header.samples, "BitsAllocated": header.bits_allocated}
    bad = [f"{name} {value}" for name, value in counts.items() if value < 1]
    if bad:
        raise DicomHeaderError(uri, f"invalid DICOM header value ({', '.join(bad)})")
    return replace(header, region=region, spacing_mm=spacing)


def _int_or_none(value) -> int | None:
    return None if value is None or value == "" else int(value)


def _study_date(value) -> str | None:
    """A DA value ``YYYYMMDD`` as ``YYYY-MM-DD``; None when absent or not a valid date (a header as written by any
    device: ``2026-01-01``, ``garbage`` and ``20261332`` are no reason to refuse the instance)."""
    text = _text(value)
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date().isoformat() if _DATE.fullmatch(text or "") else None
    except ValueError:
        return None


def _text(value) -> str | None:
    """A text element's value, stripped; a multi-valued one (malformed here) as stored, ``\\``-joined; None when
    absent or empty."""
    if value is None:
        return None
    text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
    return text.strip() or None


def _acquisition(ds: Dataset) -> str:
    if ds.get("AcquisitionDateTime"):
        return str(ds.AcquisitionDateTime)
    return f"{ds.get('AcquisitionDate', '')}{ds.get('AcquisitionTime', '')}".strip()


# ---------------------------------------------------------------------------------------------- pixels


def read_dicom_instance(uri: str, storage_options: StorageOptions = None, max_bytes: int | None = None) -> Instance:
    """Read one instance: its header, and its frames as gray ``(T, h, w)`` uint8 cropped to the imaging region.

    The object is fetched with one GET (`storage.local_copy`), parsed whole (its stored bytes: the file's size),
    then decoded frame by frame, once its header's decoded size is checked against `max_bytes` (None: no limit).
    Raises (each naming `uri`): `MissingObjectError`, `EmptyFileError`, `NotDicomError`, `DicomHeaderError`,
    `DicomDirectoryError`, `BadUidError`, `TooLargeError`, `NoPixelDataError`, `UnsupportedTransferSyntaxError`,
    `UnsupportedPhotometricError`, `BadDtypeError` (samples not 8-bit unsigned), `TruncatedFileError` (pixel
    data short, cut or corrupt).
    """
    with storage.local_copy(uri, storage_options) as local, open(local, "rb") as f:
        ds = _parse(f, uri, stop_before_pixels=False)
    header = _header(ds, uri)
    header.check_size(max_bytes)
    if "PixelData" not in ds:
        raise NoPixelDataError(uri, f"no pixel data (SOP class {UID(str(ds.get('SOPClassUID', ''))).name or '?'})")
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        name = UID(str(syntax)).name if syntax else "none given"
        raise UnsupportedTransferSyntaxError(uri, f"unsupported transfer syntax {name} ({syntax})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedPhotometricError(
            uri, f"unsupported photometric interpretation {photometric or 'none given'!r} "
                 f"(supported: {', '.join(SUPPORTED_PHOTOMETRIC)})")
    _check_samples(ds, photometric, uri)
    region, spacing, note, notes = imaging_region(ds)
    to_gray = _gray_converter(ds, photometric)
    top, left, bottom, right = region
    frames = np.empty((header.frames, bottom - top, right - left), np.uint8)
    try:
        decoded = 0
        for decoded, frame in enumerate(_iter_frames(ds, syntax, header.frames), start=1):
            frames[decoded - 1] = to_gray(frame[top:bottom, left:right])
    except Exception as err:  # noqa: BLE001 - each decoder raises its own types for bad data
        message = " ".join(str(err).split())[:200]
        raise TruncatedFileError(uri, f"truncated or corrupt pixel data ({type(err).__name__}: {message})") from err
    if decoded != header.frames:
        raise TruncatedFileError(uri, f"truncated pixel data: {decoded} of {header.frames} frames decoded")
    return Instance(header, frames, region, spacing, note, notes)


def _iter_frames(ds: Dataset, syntax: UID, n_frames: int):
    """The stored frames one by one, as pydicom decodes them with ``as_rgb=False``: ``(h, w)`` or ``(h, w, 3)``.

    Encapsulated data goes through `iter_pixels`, which walks the fragments once. Native 8-bit samples stored
    pixel by pixel (one sample, or three with PlanarConfiguration 0) are views of the Pixel Data itself: pydicom
    costs ~1 ms a frame more. Other native layouts (planar RGB, YBR_FULL_422, 16-bit palette indices) go frame
    by frame by index, because pydicom 3.0's `iter_pixels` miscounts the bytes of native YBR_FULL_422 frames.
    """
    if syntax.is_encapsulated:
        yield from pydicom.pixels.iter_pixels(ds, as_rgb=False, decoding_plugin=_DECODER[syntax])
        return
    samples = int(ds.get("SamplesPerPixel", 1))
    interleaved = samples == 1 or int(ds.get("PlanarConfiguration", 0)) == 0
    if int(ds.BitsAllocated) == 8 and interleaved and ds.PhotometricInterpretation != "YBR_FULL_422":
        shape = (int(ds.Rows), int(ds.Columns)) + ((samples,) if samples > 1 else ())
        size = int(np.prod(shape))
        data = ds.PixelData
        if len(data) < n_frames * size:
            raise ValueError(f"{len(data)} bytes of pixel data, {n_frames} frames need {n_frames * size}")
        for index in range(n_frames):
            yield np.frombuffer(data, np.uint8, count=size, offset=index * size).reshape(shape)
        return
    for index in range(n_frames):
        yield pydicom.pixels.pixel_array(ds, index=index, as_rgb=False)


def _check_samples(ds: Dataset, photometric: str, uri: str) -> None:
    allocated, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
    signed = int(ds.get("PixelRepresentation", 0))
    allowed = (8, 16) if photometric == "PALETTE COLOR" else (8,)
    if allocated not in allowed or stored != allocated or signed:
        raise BadDtypeError(
            uri, f"{'signed' if signed else 'unsigned'} samples of {stored} bits stored in {allocated}; "
                 f"expected unsigned {' or '.join(map(str, allowed))}-bit samples ({photometric})")


def _gray_converter(ds: Dataset, photometric: str):
    """A function taking one decoded frame (as pydicom gives it with ``as_rgb=False``: ``(h, w)`` or
    ``(h, w, 3)``) to ``(h, w)`` uint8 gray by the rule in the module docstring."""
    if photometric == "MONOCHROME2":
        return lambda frame: frame
    if photometric == "MONOCHROME1":
        return lambda frame: 255 - frame
    if photometric == "RGB":
        return rgb_to_gray
    if photometric.startswith("YBR_FULL"):
        return lambda frame: frame[..., 0]
    table = palette_gray_table(ds)  # PALETTE COLOR: one gray value per index, looked up per pixel
    return lambda frame: table[frame]


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> ``(...)`` uint8 BT.601 luma in PIL's fixed point (see the module docstring)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).astype(np.uint8)


def palette_gray_table(ds: Dataset) -> np.ndarray:
    """``(2**BitsStored,)`` uint8: the gray value of every palette index (luma of its RGB entry)."""
    indices = np.arange(2 ** int(ds.BitsStored), dtype=np.uint8 if int(ds.BitsStored) == 8 else np.uint16)
    rgb = pydicom.pixels.apply_color_lut(indices, ds)
    if rgb.dtype != np.uint8:  # 16-bit entries
        rgb = ((rgb.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return rgb_to_gray(rgb)


# ---------------------------------------------------------------------------------------------- region


def imaging_region(ds: Dataset) -> tuple[tuple[int, int, int, int], tuple[float, float] | None, str, tuple[str, ...]]:
    """The crop box, spacing and notes of an instance.

    Box ``(top, left, bottom, right)``, half-open, in stored pixels: the largest 2-D tissue (B-mode) region of
    the Sequence of Ultrasound Regions, clipped to the frame; the whole frame when there is none (with a note).
    Spacing ``(row, col)`` mm: that region's PhysicalDeltaY/X when both units are cm, else PixelSpacing, else
    None; the note says where it came from or why there is none.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    candidates = []
    for item in ds.get("SequenceOfUltrasoundRegions", []):
        if item.get("RegionSpatialFormat") != _SPATIAL_2D or item.get("RegionDataType") != _DATA_TISSUE:
            continue
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)  # inclusive
        except (AttributeError, TypeError, ValueError):
            continue
        top, left, bottom, right = max(y0, 0), max(x0, 0), min(y1 + 1, rows), min(x1 + 1, cols)
        if bottom > top and right > left:
            candidates.append(((bottom - top) * (right - left), (top, left, bottom, right), item))
    notes: tuple[str, ...] = ()
    if candidates:
        _, box, item = max(candidates, key=lambda c: c[0])  # the first of equal areas
        spacing, reason = _region_spacing(item)
    else:
        box, item = (0, 0, rows, cols), None
        spacing, reason = None, "no 2-D B-mode region in the Sequence of Ultrasound Regions"
        notes = ("no 2-D B-mode region in the Sequence of Ultrasound Regions: frames not cropped",)
    if spacing is not None:
        return box, spacing, "Sequence of Ultrasound Regions (PhysicalDeltaX/Y)", notes
    pixel_spacing = ds.get("PixelSpacing")
    if pixel_spacing is not None and len(pixel_spacing) == 2 and all(float(v) > 0 for v in pixel_spacing):
        return box, (float(pixel_spacing[0]), float(pixel_spacing[1])), f"PixelSpacing ({reason})", notes
    return box, None, f"no pixel spacing: {reason}, and no PixelSpacing", notes


def _region_spacing(item: Dataset) -> tuple[tuple[float, float] | None, str]:
    units = (item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection"))
    if units != (_UNITS_CM, _UNITS_CM):
        named = " x ".join(_UNIT_NAMES.get(u, str(u)) for u in units)
        return None, f"the B-mode region's physical units are {named}, not cm"
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        dx, dy = abs(float(item.PhysicalDeltaX)), abs(float(item.PhysicalDeltaY))
        if dx > 0 and dy > 0:
            return (dy * 10.0, dx * 10.0), ""
    return None, "the B-mode region has no positive PhysicalDeltaX/Y"
