"""A fast reader for the MetaImage stacks (.mha, .mhd) that SimpleITK writes, such as ACOUSLIC's.

`read_metaimage` parses the text header itself and inflates the pixel data with libdeflate (bundled by
the `deflate` package) into a numpy array, or into a `DecodeBuffer` that a scoring read task reuses case after
case: on an ACOUSLIC-size case 0.61 ms a frame against 1.11 for SimpleITK's reader, which inflates with
zlib-ng (median, one core of the dev VM; benchmarks/RESULTS-decode-resize.md).
It reads only what it covers and answers None for anything else, so that the caller falls back to
SimpleITK: never an error for a file SimpleITK would read, and never different pixels.

Covered header keys (exact spelling, one ``Key = Value`` a line, up to ``ElementDataFile``):
- ``ObjectType = Image``, ``NDims = 3``, ``DimSize`` (3 positive integers, fastest axis first);
- ``ElementType``: MET_UCHAR, MET_CHAR, MET_USHORT, MET_SHORT, MET_UINT, MET_INT, MET_FLOAT, MET_DOUBLE;
- ``ElementNumberOfChannels = 1`` (or absent); ``BinaryData = True`` (or absent: MetaIO's default);
- ``BinaryDataByteOrderMSB`` / ``ElementByteOrderMSB`` (True or False; when both, they must agree);
- ``CompressedData`` (True or False) with ``CompressedDataSize``: a zlib stream (the one stream MetaIO
  writes, whatever the chunks it was written in); the size may be left out only for a separate data file,
  which then holds the stream alone;
- ``ElementSpacing`` (3 positive numbers; ``ElementSize`` is then ignored, as MetaIO ignores it);
- ``HeaderSize``: absent or 0, or a positive byte offset into a separate data file;
- ``ElementDataFile``: ``LOCAL`` (pixels follow the header) or one file name, relative to the header's folder.
Ignored, as they change no pixel: geometry (``Offset``, ``Origin``, ``Position``, ``TransformMatrix``,
``Rotation``, ``Orientation``, ``CenterOfRotation``, ``AnatomicalOrientation``) and any other key, which
MetaIO keeps as metadata only.
Not covered (None): any other value of the keys above, ``HeaderSize = -1``, ``LIST`` or ``%d`` data files,
``ElementToIntensityFunctionSlope``/``Offset``, a gzip-wrapped stream, repeated keys, another letter case of
a key above, lines without ``=`` or with ``\\r``, a short file or a stream that does not inflate to
exactly the declared size (SimpleITK then reports the damage as it always has).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from dataclasses import dataclass

import deflate
import deflate._deflate
import numpy as np

SUFFIXES = (".mha", ".mhd")
# A MetaImage header is a few hundred bytes; one with more than this much metadata is left to SimpleITK.
HEADER_LIMIT = 1 << 16

_ELEMENT_TYPES = {
    "MET_UCHAR": np.uint8, "MET_CHAR": np.int8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16,
    "MET_UINT": np.uint32, "MET_INT": np.int32, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}
_LOCAL_NAMES = ("LOCAL", "Local", "local")  # the spellings MetaIO accepts
_UNCOVERED_KEYS = ("ElementToIntensityFunctionSlope", "ElementToIntensityFunctionOffset")
# Keys that decide how pixels are read, by their lower-case spelling: another spelling of one of them is not
# ignored as metadata (in case a reader matched keys without regard to case) but sent to SimpleITK.
_PIXEL_KEYS = {key.lower(): key for key in (
    "ObjectType", "NDims", "DimSize", "ElementType", "ElementNumberOfChannels", "BinaryData",
    "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData", "CompressedDataSize", "HeaderSize",
    "ElementSpacing", "ElementSize", "ElementDataFile", *_UNCOVERED_KEYS)}


@dataclass(frozen=True)
class MetaImage:
    """Decoded pixels of a 3-D MetaImage.

    pixels: ``(T, H, W)`` in the file's element type, native byte order, C-contiguous and writable: the
    layout and dtype of SimpleITK's ``GetArrayFromImage``. spacing: ``(x, y, z)`` = (column, row, frame)
    in the header's units, as SimpleITK's ``GetSpacing``.
    """

    pixels: np.ndarray
    spacing: tuple[float, float, float]


class DecodeBuffer:
    """Memory that one reader decodes case after case into, so that each case does not map fresh pages.

    A new 351 MB buffer per ACOUSLIC case costs the kernel's page faults (and zeroing) on every case: on the
    2-core dev VM the decode took a median 1.33 ms a frame into fresh memory against 0.61 into reused memory
    (benchmarks/RESULTS-decode-resize.md). Arrays handed out are views of one allocation, valid until the
    next `array` call: only a caller that is done with a case's pixels before it reads the next (a scoring
    read task resizes them at once) may share one.
    """

    def __init__(self) -> None:
        self._memory = np.empty(0, np.uint8)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous writable ``shape`` array of `dtype` in this buffer (grown when too small)."""
        n_bytes = math.prod(shape) * np.dtype(dtype).itemsize
        if self._memory.nbytes < n_bytes:
            self._memory = np.empty(0, np.uint8)  # let the old allocation go before taking the larger one
            self._memory = np.empty(n_bytes, np.uint8)
        return self._memory[:n_bytes].view(dtype).reshape(shape)


@dataclass(frozen=True)
class _Layout:
    """Where and how a header says its pixels are stored."""

    shape: tuple[int, int, int]  # (T, H, W)
    dtype: np.dtype  # native byte order
    big_endian: bool
    spacing: tuple[float, float, float]
    data_path: str
    data_offset: int
    compressed_size: int | None  # None: uncompressed; -1: the rest of the data file


def read_metaimage(path: str, buffer: DecodeBuffer | None = None) -> MetaImage | None:
    """The pixels and spacing of the local MetaImage at `path`, or None when the file is outside what
    this module covers (see the module docstring) or damaged: the caller then reads it with SimpleITK.

    Memory: one buffer of the decoded size (the returned array, which libdeflate fills): a new array, or
    a view into `buffer` when given (valid until `buffer`'s next use); the compressed bytes are mapped from
    the file, not copied.
    """
    try:
        layout = _parse_layout(path)
        if layout is None:
            return None
        pixels = _inflate(layout, buffer) if layout.compressed_size is not None else _read_raw(layout, buffer)
    except (OSError, ValueError, deflate.DeflateError):  # unreadable or damaged: SimpleITK decides
        return None
    if pixels is None:
        return None
    if layout.big_endian and pixels.dtype.itemsize > 1:
        pixels.byteswap(inplace=True)
    return MetaImage(pixels, layout.spacing)


def parse_header(head: bytes) -> tuple[dict[str, str], int] | None:
    """The header fields of `head` (a MetaImage file's first bytes) and the offset of the byte after the
    ``ElementDataFile`` line, or None when `head` holds no header this module reads."""
    fields: dict[str, str] = {}
    offset = 0
    while offset < len(head):
        end = head.find(b"\n", offset)
        end = len(head) if end < 0 else end
        line = head[offset:end]
        offset = end + 1
        if not line.strip():
            continue
        if b"\r" in line or b"=" not in line:
            return None
        key, _, value = line.decode("ascii").partition("=")  # non-ASCII: ValueError, caught by the caller
        key = key.strip()
        if key in fields:
            return None
        fields[key] = value.strip()
        if key == "ElementDataFile":
            return fields, min(offset, len(head))
    return None


def _parse_layout(path: str) -> _Layout | None:
    with open(path, "rb") as f:
        head = f.read(HEADER_LIMIT)
    parsed = parse_header(head)
    if parsed is None:
        return None
    fields, header_end = parsed
    if len(head) == HEADER_LIMIT and not head[:header_end].endswith(b"\n"):
        return None  # the ElementDataFile line may go on past what was read
    if any(key in fields for key in _UNCOVERED_KEYS) or any(
            _PIXEL_KEYS.get(key.lower(), key) != key for key in fields):
        return None
    if (fields.get("ObjectType") != "Image" or fields.get("NDims") != "3"
            or fields.get("ElementNumberOfChannels", "1") != "1"
            or not _flag(fields, "BinaryData", default=True)):
        return None
    dims = [int(v) for v in fields.get("DimSize", "").split()]
    spacing = tuple(float(v) for v in fields.get("ElementSpacing", "").split())
    dtype = _ELEMENT_TYPES.get(fields.get("ElementType", ""))
    big_endian = _byte_order_msb(fields)
    if (len(dims) != 3 or min(dims) < 1 or len(spacing) != 3
            or not all(math.isfinite(s) and s > 0 for s in spacing) or dtype is None or big_endian is None):
        return None
    compressed = _flag(fields, "CompressedData", default=False)
    header_size = int(fields.get("HeaderSize", "0"))
    # MetaIO reads a CompressedDataSize of 0 (or none) as "the whole data file, from its first byte".
    compressed_size = int(fields.get("CompressedDataSize", "0")) if compressed else None
    data_file = fields["ElementDataFile"]
    if compressed is None or header_size < 0 or (compressed_size or 0) < 0:
        return None
    if data_file in _LOCAL_NAMES:
        if header_size != 0 or compressed_size == 0:
            return None  # MetaIO would seek from the file's start: the header's first byte
        data_path, data_offset = path, header_end
    else:
        if data_file.startswith("LIST") or "%" in data_file or (compressed_size == 0 and header_size != 0):
            return None
        data_path = os.path.join(os.path.dirname(path), data_file)  # an absolute name stays as it is
        data_offset = header_size
        compressed_size = -1 if compressed_size == 0 else compressed_size
    return _Layout(
        shape=(dims[2], dims[1], dims[0]), dtype=np.dtype(dtype), big_endian=big_endian, spacing=spacing,
        data_path=data_path, data_offset=data_offset, compressed_size=compressed_size,
    )


def _flag(fields: dict[str, str], key: str, default: bool) -> bool | None:
    """A True/False field (None for any other value, which then fails the caller's checks)."""
    value = fields.get(key)
    if value is None:
        return default
    return {"true": True, "false": False}.get(value.lower())


def _byte_order_msb(fields: dict[str, str]) -> bool | None:
    """Whether the pixels are big-endian; None when the two byte-order keys are unreadable or disagree."""
    values = {_flag(fields, key, default=None) for key in ("BinaryDataByteOrderMSB", "ElementByteOrderMSB")
              if key in fields}
    if None in values or len(values) > 1:
        return None
    return values.pop() if values else False


def _inflate(layout: _Layout, buffer: DecodeBuffer | None) -> np.ndarray | None:
    """Inflate the zlib stream into one array of the decoded size: ``(T, H, W)`` of `layout.dtype`."""
    n_bytes = math.prod(layout.shape) * layout.dtype.itemsize
    with open(layout.data_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with memoryview(mapped) as whole:
            end = len(whole) if layout.compressed_size == -1 else layout.data_offset + layout.compressed_size
            if end > len(whole) or end - layout.data_offset < 2:
                return None
            with whole[layout.data_offset:end] as stream:
                if not _is_zlib_header(stream[0], stream[1]):
                    return None
                if _LIBDEFLATE is None:
                    inflated = deflate.zlib_decompress(stream, n_bytes)  # the package's own bytearray
                    return np.frombuffer(inflated, layout.dtype).reshape(layout.shape) if len(inflated) == n_bytes else None
                pixels = _new_pixels(layout, buffer)
                return pixels if _LIBDEFLATE.inflate_exactly(stream, pixels) else None


class _Libdeflate:
    """libdeflate's own C API, from the copy the `deflate` package bundles and exports.

    Why not ``deflate.zlib_decompress``: it returns a new bytearray, which malloc maps in 4 KiB pages that
    fault one by one as libdeflate writes them; for an ACOUSLIC case (351 MB) that is 86,000 faults, a fifth of
    the decode's CPU (best of 12: 0.81 against 0.64 ms a frame, benchmarks/RESULTS-decode-resize.md). A numpy buffer of
    that size is advised to transparent huge pages, so libdeflate writes the pixels straight into the
    array fetaliqa returns. Same function, same checks (the Adler-32 trailer, the exact decoded size).
    """

    _SUCCESS = 0

    def __init__(self, library: ctypes.CDLL):
        self._alloc = library.libdeflate_alloc_decompressor
        self._alloc.restype, self._alloc.argtypes = ctypes.c_void_p, []
        self._free = library.libdeflate_free_decompressor
        self._free.restype, self._free.argtypes = None, [ctypes.c_void_p]
        self._zlib_decompress = library.libdeflate_zlib_decompress
        self._zlib_decompress.restype = ctypes.c_int
        # (decompressor, in, in_nbytes, out, out_nbytes_avail, actual_out_nbytes_ret): with the last NULL,
        # libdeflate succeeds only when the stream fills `out` exactly.
        self._zlib_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                          ctypes.c_size_t, ctypes.c_void_p]

    def inflate_exactly(self, stream: memoryview, out: np.ndarray) -> bool:
        """Inflate the zlib `stream` into the C-contiguous `out`; True when it filled `out` exactly."""
        source = np.frombuffer(stream, np.uint8)  # a view, for its address; ctypes releases the GIL in the call
        decompressor = self._alloc()  # ~10 kB; one per call, as a decompressor serves one thread at a time
        if not decompressor:
            raise MemoryError("libdeflate could not allocate a decompressor")
        try:
            result = self._zlib_decompress(decompressor, source.ctypes.data, source.nbytes, out.ctypes.data,
                                           out.nbytes, None)
        finally:
            self._free(decompressor)
        return result == self._SUCCESS


def _load_libdeflate() -> _Libdeflate | None:
    """libdeflate from the `deflate` package's extension, or None where a build does not export its API
    (then `deflate.zlib_decompress` inflates, a little slower)."""
    try:
        return _Libdeflate(ctypes.CDLL(deflate._deflate.__file__))
    except (OSError, AttributeError):
        return None


_LIBDEFLATE = _load_libdeflate()


def _new_pixels(layout: _Layout, buffer: DecodeBuffer | None) -> np.ndarray:
    return np.empty(layout.shape, layout.dtype) if buffer is None else buffer.array(layout.shape, layout.dtype)


def _is_zlib_header(cmf: int, flg: int) -> bool:
    """RFC 1950: method 8 (deflate) and a header checksum that divides by 31 (a gzip stream fails it)."""
    return cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0


def _read_raw(layout: _Layout, buffer: DecodeBuffer | None) -> np.ndarray | None:
    """Read uncompressed pixels straight into a ``(T, H, W)`` array of `layout.dtype`."""
    pixels = _new_pixels(layout, buffer)
    with memoryview(pixels).cast("B") as target, open(layout.data_path, "rb", buffering=0) as f:
        f.seek(layout.data_offset)
        filled = 0
        while filled < len(target):
            n = f.readinto(target[filled:])
            if not n:
                return None  # short file
            filled += n
    return pixels
