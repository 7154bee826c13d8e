"""fetaliqa.inputs.metaimage against SimpleITK: the same pixels, bit for bit, and None where it does not cover a
file; read_image_stack gives the same frames and errors with the fast path as without it."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fetaliqa import errors
from fetaliqa.errors import InputError
from fetaliqa.inputs import metaimage
from fetaliqa.inputs.metaimage import read_metaimage
from fetaliqa.inputs.stacks import read_image_stack

ODD_SHAPE = (6, 13, 7)  # (T, H, W): odd rows and columns, a multiple of 6 frames
SPACING = (0.28000000000000003, 0.31, 1.5)
DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64)


def _pixels(dtype, shape=ODD_SHAPE, seed=0) -> np.ndarray:
    """Values spread over the type's range (negative ones and fractions included where the type has them)."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return (rng.standard_normal(shape) * 1e3).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _write_with_sitk(path: Path, array: np.ndarray, compress: bool) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def _write_by_hand(path: Path, fields: list[str], data: bytes, data_file: str = "LOCAL") -> Path:
    """A MetaImage whose header is `fields` ("Key = Value" lines) then ElementDataFile; `data` goes after
    the header (LOCAL) or into `data_file` beside it."""
    header = "\n".join([*fields, f"ElementDataFile = {data_file}"]) + "\n"
    if data_file == "LOCAL":
        path.write_bytes(header.encode() + data)
    else:
        path.write_text(header)
        (path.parent / data_file).write_bytes(data)
    return path


def _header(array: np.ndarray, element_type: str, *extra: str) -> list[str]:
    t, h, w = array.shape
    return ["ObjectType = Image", "NDims = 3", "BinaryData = True", *extra,
            "ElementSpacing = 0.5 0.25 2", f"DimSize = {w} {h} {t}", f"ElementType = {element_type}"]


def _assert_same_as_sitk(path: Path) -> None:
    fast = read_metaimage(str(path))
    assert fast is not None, "the fast path should cover this file"
    reference = sitk.ReadImage(str(path))
    expected = sitk.GetArrayFromImage(reference)
    assert fast.pixels.dtype == expected.dtype
    assert fast.pixels.shape == expected.shape
    assert fast.pixels.tobytes() == expected.tobytes()  # bit for bit, floats included
    assert fast.pixels.flags.c_contiguous and fast.pixels.flags.writeable
    assert fast.spacing == reference.GetSpacing()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("compress", [True, False], ids=["zlib", "raw"])
@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_files_simpleitk_writes_read_bit_identically(tmp_path, dtype, compress, suffix):
    path = _write_with_sitk(tmp_path / f"case{suffix}", _pixels(dtype), compress)
    if suffix == ".mhd":  # the pixels sit in a separate .raw / .zraw file
        assert (tmp_path / f"case.{'zraw' if compress else 'raw'}").exists()
    _assert_same_as_sitk(path)


def test_acouslic_frame_size_reads_bit_identically(tmp_path):
    rng = np.random.default_rng(1)
    speckle = np.clip(rng.rayleigh(40.0, size=(12, 562, 744)), 0, 255).astype(np.uint8)
    _assert_same_as_sitk(_write_with_sitk(tmp_path / "case.mha", speckle, compress=True))


@pytest.mark.parametrize("key", ["BinaryDataByteOrderMSB", "ElementByteOrderMSB"])
@pytest.mark.parametrize("compress", [True, False], ids=["zlib", "raw"])
@pytest.mark.parametrize("dtype, element_type", [(np.int16, "MET_SHORT"), (np.float32, "MET_FLOAT"),
                                                 (np.uint8, "MET_UCHAR")])
def test_big_endian_files_read_bit_identically(tmp_path, key, compress, dtype, element_type):
    array = _pixels(dtype)
    data = array.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    extra = [f"{key} = True"]
    if compress:
        data = zlib.compress(data)
        extra += ["CompressedData = True", f"CompressedDataSize = {len(data)}"]
    path = _write_by_hand(tmp_path / "big.mha", _header(array, element_type, *extra), data)
    _assert_same_as_sitk(path)
    assert np.array_equal(read_metaimage(str(path)).pixels, array)


def test_separate_data_file_after_a_header_size_reads_bit_identically(tmp_path):
    array = _pixels(np.int16)
    path = _write_by_hand(tmp_path / "skip.mhd", _header(array, "MET_SHORT", "HeaderSize = 100"),
                          bytes(range(100)) + array.tobytes(), data_file="skip.raw")
    _assert_same_as_sitk(path)


def test_compressed_data_file_without_a_size_reads_bit_identically(tmp_path):
    array = _pixels(np.uint8)
    path = _write_by_hand(tmp_path / "nosize.mhd", _header(array, "MET_UCHAR", "CompressedData = True"),
                          zlib.compress(array.tobytes()), data_file="nosize.zraw")
    _assert_same_as_sitk(path)


def _uncovered(tmp_path: Path, case: str) -> tuple[Path, np.ndarray]:
    """A MetaImage that SimpleITK reads but the fast path does not cover, and its (T, H, W) pixels."""
    array = _pixels(np.uint8)
    raw = array.tobytes()
    if case == "header size -1":  # the pixels are the data file's last bytes
        return _write_by_hand(tmp_path / "end.mhd", _header(array, "MET_UCHAR", "HeaderSize = -1"),
                              b"junk" * 10 + raw, data_file="end.raw"), array
    if case == "gzip stream":  # MetaIO's inflate also takes a gzip wrapper
        data = gzip.compress(raw)
        fields = _header(array, "MET_UCHAR", "CompressedData = True", f"CompressedDataSize = {len(data)}")
        return _write_by_hand(tmp_path / "gz.mha", fields, data), array
    if case == "intensity function":
        fields = _header(array, "MET_UCHAR", "ElementToIntensityFunctionSlope = 1")
        return _write_by_hand(tmp_path / "slope.mha", fields, raw), array
    if case == "key in lower case":
        fields = _header(array, "MET_UCHAR", "compresseddata = False")
        return _write_by_hand(tmp_path / "lower.mha", fields, raw), array
    if case == "no spacing":
        fields = [f for f in _header(array, "MET_UCHAR") if not f.startswith("ElementSpacing")]
        return _write_by_hand(tmp_path / "nospacing.mha", fields, raw), array
    if case == "int64 pixels":
        wide = array.astype(np.int64)
        return _write_with_sitk(tmp_path / "wide.mha", wide, compress=True), array
    raise AssertionError(case)


UNCOVERED = ["header size -1", "gzip stream", "intensity function", "key in lower case", "no spacing",
             "int64 pixels"]


@pytest.mark.parametrize("case", UNCOVERED)
def test_files_outside_the_covered_keys_are_left_to_simpleitk(tmp_path, case):
    path, array = _uncovered(tmp_path, case)
    assert read_metaimage(str(path)) is None
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), array)  # SimpleITK reads it


def _damaged(tmp_path: Path, damage: str) -> Path:
    path = _write_with_sitk(tmp_path / f"{damage}.mha", _pixels(np.uint8, (6, 64, 48)),
                            compress=damage != "raw cut")
    data = bytearray(path.read_bytes())
    if damage in ("zlib cut", "raw cut"):
        del data[-len(data) // 3:]
    elif damage == "zlib flipped":  # same length, a stream that no longer inflates (or fails its checksum)
        middle = len(data) - 2000
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", ["zlib cut", "zlib flipped", "raw cut"])
def test_damaged_pixel_data_is_left_to_simpleitk(tmp_path, damage):
    assert read_metaimage(str(_damaged(tmp_path, damage))) is None


def test_missing_data_file_is_left_to_simpleitk(tmp_path):
    path = _write_with_sitk(tmp_path / "case.mhd", _pixels(np.uint8), compress=True)
    (tmp_path / "case.zraw").unlink()
    assert read_metaimage(str(path)) is None


# ---------------------------------------------------------------------------------------------- read_image_stack


def _outcome(path: Path):
    """What `read_image_stack` gives for `path`: its frames and spacing, or its error's class and message."""
    try:
        stack = read_image_stack(str(path))
    except InputError as err:
        return type(err), str(err)
    return stack.frames.dtype, stack.frames.shape, stack.frames.tobytes(), stack.spacing_mm


def _without_fast_path(monkeypatch, path: Path):
    with monkeypatch.context() as patch:
        patch.setattr(metaimage, "read_metaimage", lambda local, buffer=None: None)
        return _outcome(path)


def test_read_image_stack_decodes_covered_files_without_simpleitks_pixel_reader(tmp_path, monkeypatch):
    array = _pixels(np.uint8)
    path = _write_with_sitk(tmp_path / "case.mha", array, compress=True)

    def no_pixel_read(self):
        raise AssertionError("SimpleITK decoded the pixels of a file the fast path covers")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_pixel_read)
    stack = read_image_stack(str(path))
    assert np.array_equal(stack.frames, array) and stack.frames.flags.writeable
    assert stack.spacing_mm == (SPACING[1], SPACING[0])


def _typed(tmp_path: Path, case: str) -> Path:
    """Files for the pixel rule of `read_image_stack`, all covered by the fast path."""
    rng = np.random.default_rng(2)
    arrays = {
        "float in [0, 1]": rng.random(ODD_SHAPE, dtype=np.float32),
        "float in [0, 255]": (rng.random(ODD_SHAPE) * 255).astype(np.float64),
        "uint16 in [0, 255]": rng.integers(0, 255, ODD_SHAPE, endpoint=True).astype(np.uint16),
        "int16 with negatives": _pixels(np.int16),
        "float with NaN": np.full(ODD_SHAPE, np.nan, np.float32),
    }
    return _write_with_sitk(tmp_path / "typed.mha", arrays[case], compress=True)


@pytest.mark.parametrize("case", ["float in [0, 1]", "float in [0, 255]", "uint16 in [0, 255]",
                                  "int16 with negatives", "float with NaN"])
def test_read_image_stack_applies_the_same_pixel_rule_on_the_fast_path(tmp_path, monkeypatch, case):
    path = _typed(tmp_path, case)
    assert read_metaimage(str(path)) is not None
    assert _outcome(path) == _without_fast_path(monkeypatch, path)


@pytest.mark.parametrize("case", UNCOVERED)
def test_read_image_stack_reads_uncovered_files_through_simpleitk(tmp_path, case):
    path, array = _uncovered(tmp_path, case)
    assert np.array_equal(read_image_stack(str(path)).frames, array)


@pytest.mark.parametrize("damage", ["zlib cut", "zlib flipped", "raw cut"])
def test_read_image_stack_reports_damage_as_before(tmp_path, monkeypatch, damage):
    path = _damaged(tmp_path, damage)
    assert _outcome(path) == _without_fast_path(monkeypatch, path)
    # A stream that inflates wrongly: SimpleITK prints "Uncompress failed" and returns frames anyway; the fast
    # path leaves that to it unchanged (libdeflate's failure only sends the file back to SimpleITK).
    if damage != "zlib flipped":
        with pytest.raises(errors.TruncatedFileError, match=f"^{path}: truncated or corrupt image data"):
            read_image_stack(str(path))


def test_the_pinned_deflate_package_exports_libdeflates_c_api():
    """The fast path writes into a numpy buffer through libdeflate's C API (see `metaimage._Libdeflate`);
    a `deflate` build that stops exporting it would silently fall back to the slower bytearray path."""
    assert metaimage._LIBDEFLATE is not None


@pytest.fixture(params=["libdeflate C API", "deflate.zlib_decompress"])
def inflater(request, monkeypatch):
    """Each test using it runs with both of `read_metaimage`'s inflaters."""
    if request.param == "deflate.zlib_decompress":
        monkeypatch.setattr(metaimage, "_LIBDEFLATE", None)
    return request.param


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64], ids=lambda d: np.dtype(d).name)
def test_both_inflaters_read_bit_identically(tmp_path, inflater, dtype):
    _assert_same_as_sitk(_write_with_sitk(tmp_path / "case.mha", _pixels(dtype), compress=True))


def test_both_inflaters_read_big_endian_bit_identically(tmp_path, inflater):
    array = _pixels(np.int16)
    stream = zlib.compress(array.astype(">i2").tobytes())
    path = _write_by_hand(tmp_path / "case.mha", _header(array, "MET_SHORT", "BinaryDataByteOrderMSB = True",
                                                         "CompressedData = True", f"CompressedDataSize = {len(stream)}"),
                          stream)
    fast = read_metaimage(str(path))
    assert fast is not None and fast.pixels.dtype == np.int16 and np.array_equal(fast.pixels, array)


@pytest.mark.parametrize("size", ["longer", "shorter"])
def test_both_inflaters_leave_a_stream_of_another_size_to_simpleitk(tmp_path, inflater, size):
    array = _pixels(np.uint8)
    data = array.tobytes() + b"\x07" * 10 if size == "longer" else array.tobytes()[:-10]
    stream = zlib.compress(data)
    path = _write_by_hand(tmp_path / "case.mha", _header(array, "MET_UCHAR", "CompressedData = True",
                                                         f"CompressedDataSize = {len(stream)}"), stream)
    assert read_metaimage(str(path)) is None


@pytest.mark.parametrize("damage", ["zlib cut", "zlib flipped"])
def test_both_inflaters_leave_damaged_streams_to_simpleitk(tmp_path, inflater, damage):
    assert read_metaimage(str(_damaged(tmp_path, damage))) is None


def test_a_decode_buffer_serves_case_after_case_from_one_allocation(tmp_path):
    first = _write_with_sitk(tmp_path / "first.mha", _pixels(np.uint8, seed=1), compress=True)
    second = _write_with_sitk(tmp_path / "second.mha", _pixels(np.uint8, seed=2), compress=False)
    larger = _write_with_sitk(tmp_path / "larger.mha", _pixels(np.float32, (12, 13, 7)), compress=True)
    buffer = metaimage.DecodeBuffer()
    read_first = read_metaimage(str(first), buffer).pixels
    assert np.array_equal(read_first, sitk.GetArrayFromImage(sitk.ReadImage(str(first))))
    read_second = read_metaimage(str(second), buffer).pixels
    assert np.shares_memory(read_first, read_second)  # the same memory, now the second case's
    assert np.array_equal(read_second, sitk.GetArrayFromImage(sitk.ReadImage(str(second))))
    for path in (larger, first):  # grows for the larger case, then serves the smaller one from that
        pixels = read_metaimage(str(path), buffer).pixels
        assert pixels.tobytes() == sitk.GetArrayFromImage(sitk.ReadImage(str(path))).tobytes()
        assert pixels.flags.c_contiguous and pixels.flags.writeable


def test_read_case_row_gives_the_same_frames_with_a_shared_buffer(tmp_path):
    from fetaliqa.score.read import read_case_row  # noqa: PLC0415 - the scoring read path, used by one test here

    cases = [_write_with_sitk(tmp_path / "small.mha", _pixels(np.uint8, (6, 40, 52), seed=3), compress=True),
             _write_with_sitk(tmp_path / "large.mha", _pixels(np.uint8, (12, 70, 90), seed=4), compress=True),
             _write_with_sitk(tmp_path / "raw.mha", _pixels(np.uint8, (6, 40, 52), seed=5), compress=False)]
    buffer = metaimage.DecodeBuffer()
    for path in cases + cases[::-1]:
        shared = read_case_row(path.stem, str(path), image_size=32, buffer=buffer)
        alone = read_case_row(path.stem, str(path), image_size=32)
        assert shared["error"] == "" and np.array_equal(shared["images"], alone["images"])
        assert not np.shares_memory(shared["images"], buffer.array((1,), np.uint8))  # resized copies leave it
