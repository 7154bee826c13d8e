"""DICOM input: real files written with pydicom (and SimpleITK/GDCM for JPEG Lossless), read back by
`fetaliqa.inputs.dicom`; expected pixels are known by construction or come from an independent decoder (PIL)."""

from __future__ import annotations

import csv
import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from fetaliqa import errors
from fetaliqa.inputs import layout
from fetaliqa.inputs.dicom import is_valid_uid, read_dicom_header, read_dicom_instance
from fetaliqa.synthetic.archive import synthetic_cases
from fetaliqa.synthetic.dicom import BANNER_ROWS, SWEEP_ENCODINGS, region_box, study_uid_of, write_synthetic_dicom_archive
from jobs.synth import main as synth_main

# Stored frames of ROWS x COLS with the imaging region at (TOP, LEFT), REGION_H x REGION_W, 16-aligned so that
# JPEG blocks (and 4:2:x chroma) never straddle the region's edge; burned-in "text" (255) fills the banner.
T, ROWS, COLS = 3, 64, 80
TOP, LEFT, REGION_H, REGION_W = 16, 16, 32, 48
TEXT = 255


def _gray_frames(seed: int = 0) -> np.ndarray:
    """(T, REGION_H, REGION_W) uint8: smooth gradients plus noise, every value below TEXT."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:REGION_H, 0:REGION_W]
    base = 40 + 3 * x + 2 * y
    return np.stack([np.clip(base + t * 10 + rng.integers(0, 8, base.shape), 0, 250) for t in range(T)]).astype(np.uint8)


def _canvas(region: np.ndarray) -> np.ndarray:
    """Put (T, h, w[, 3]) region frames into (T, ROWS, COLS[, 3]) stored frames with text around them."""
    canvas = np.zeros((T, ROWS, COLS) + region.shape[3:], np.uint8)
    canvas[:, 2:TOP - 4, 4:COLS - 4] = TEXT  # the banner
    canvas[:, TOP + REGION_H + 4:, LEFT:LEFT + 20] = TEXT  # a caption below the region
    canvas[:, TOP:TOP + REGION_H, LEFT:LEFT + REGION_W] = region
    return canvas


def _region_item(top, left, height, width, data_type=1, units=3, delta=(0.028, 0.028)) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, data_type, 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = left, top
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = left + width - 1, top + height - 1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX, item.PhysicalDeltaY = delta
    return item


def _dataset(photometric: str = "MONOCHROME2", samples: int = 1, bits: int = 8, regions=None, **attrs) -> Dataset:
    """A US Multi-frame Image of T frames of ROWS x COLS, without pixel data; `regions` default: the one
    imaging region at (TOP, LEFT) with 0.028 cm deltas."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundMultiFrameImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLS, T
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if regions is None:
        regions = [_region_item(TOP, LEFT, REGION_H, REGION_W)]
    if regions:
        ds.SequenceOfUltrasoundRegions = Sequence(regions)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _save(ds: Dataset, path, syntax=ExplicitVRLittleEndian, pixels: np.ndarray | None = None) -> str:
    if pixels is not None:
        if syntax.is_encapsulated:
            ds.compress(syntax, pixels, generate_instance_uid=False)
        else:
            ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(str(path), enforce_file_format=True)  # encoded as the file meta's transfer syntax says
    return str(path)


def _encapsulated(ds: Dataset, path, syntax, frames: list[bytes]) -> str:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def _jpeg(frame: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG", **options)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                    RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_lossless_syntaxes_give_the_region_exactly(tmp_path, syntax):
    gray = _gray_frames()
    path = _save(_dataset(), tmp_path / "sweep.dcm", syntax, _canvas(gray))
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    instance = read_dicom_instance(path)
    assert instance.frames.dtype == np.uint8 and instance.frames.shape == (T, REGION_H, REGION_W)
    np.testing.assert_array_equal(instance.frames, gray)
    assert instance.region == (TOP, LEFT, TOP + REGION_H, LEFT + REGION_W)
    assert instance.spacing_mm == pytest.approx((0.28, 0.28))


def test_jpeg_lossless_written_by_gdcm(tmp_path):
    """JPEG Lossless (process 14, SV1) frames encoded by GDCM through SimpleITK, wrapped in a US instance."""
    gray = _gray_frames(1)
    gdcm_file = tmp_path / "gdcm.dcm"
    sitk.WriteImage(sitk.GetImageFromArray(_canvas(gray)), str(gdcm_file), useCompression=True, compressor="JPEG")
    source = pydicom.dcmread(gdcm_file)
    assert source.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    fragments = list(generate_frames(source.PixelData, number_of_frames=T))
    path = _encapsulated(_dataset(), tmp_path / "sweep", JPEGLosslessSV1, fragments)  # no extension
    np.testing.assert_array_equal(read_dicom_instance(path).frames, gray)


def test_jpeg_baseline_gray_within_jpeg_error(tmp_path):
    gray = _gray_frames(2)
    frames = [_jpeg(f, quality=100) for f in _canvas(gray)]
    instance = read_dicom_instance(_encapsulated(_dataset(), tmp_path / "b.dcm", JPEGBaseline8Bit, frames))
    reference = np.stack([np.asarray(Image.open(io.BytesIO(f)))[TOP:TOP + REGION_H, LEFT:LEFT + REGION_W] for f in frames])
    assert np.abs(instance.frames.astype(int) - reference).max() <= 1  # libjpeg vs PIL's libjpeg-turbo IDCT
    assert np.abs(instance.frames.astype(int) - gray).max() <= 3


@pytest.mark.parametrize("photometric,subsampling", [("YBR_FULL_422", 1), ("YBR_FULL", 0)])
def test_jpeg_baseline_colour_takes_the_luma_sample(tmp_path, photometric, subsampling):
    """Gray content in colour JPEG (yellow text around it): the gray is the decoded Y sample, which PIL's own
    decoder gives in its YCbCr draft mode."""
    gray = _gray_frames(3)
    rgb = _canvas(np.repeat(gray[..., None], 3, axis=3))
    rgb[:, 2:TOP - 4, 4:COLS - 4] = (255, 220, 0)
    frames = [_jpeg(f, quality=100, subsampling=subsampling) for f in rgb]
    ds = _dataset(photometric, samples=3)
    instance = read_dicom_instance(_encapsulated(ds, tmp_path / "c.dcm", JPEGBaseline8Bit, frames))

    def luma(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data))
        image.draft("YCbCr", image.size)
        return np.asarray(image)[TOP:TOP + REGION_H, LEFT:LEFT + REGION_W, 0]

    assert np.abs(instance.frames.astype(int) - np.stack([luma(f) for f in frames])).max() <= 1
    assert np.abs(instance.frames.astype(int) - gray).max() <= 3


# ---------------------------------------------------------------------------------------------- photometric


def test_monochrome1_is_inverted(tmp_path):
    gray = _gray_frames()
    path = _save(_dataset("MONOCHROME1"), tmp_path / "m1.dcm", pixels=_canvas(255 - gray))
    np.testing.assert_array_equal(read_dicom_instance(path).frames, gray)


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_gray_is_pils_luma(tmp_path, planar):
    rgb = np.random.default_rng(4).integers(0, 256, (T, REGION_H, REGION_W, 3), np.uint8)
    canvas = _canvas(rgb)
    ds = _dataset("RGB", samples=3, PlanarConfiguration=planar)
    stored = canvas.transpose(0, 3, 1, 2) if planar else canvas  # planar 1: R plane, G plane, B plane
    path = _save(ds, tmp_path / "rgb.dcm", pixels=np.ascontiguousarray(stored))
    expected = np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in rgb])
    np.testing.assert_array_equal(read_dicom_instance(path).frames, expected)


def test_native_ybr_full_and_422_give_y(tmp_path):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 256, (T, ROWS, COLS), np.uint8)
    cb, cr = rng.integers(0, 256, (2, T, ROWS, COLS // 2), np.uint8)
    full = np.stack([y, np.repeat(cb, 2, axis=2), np.repeat(cr, 2, axis=2)], axis=-1)
    packed = np.stack([y[..., 0::2], y[..., 1::2], cb, cr], axis=-1)  # Y1 Y2 Cb Cr per pixel pair (PS3.5 8.2.1)
    crop = y[:, TOP:TOP + REGION_H, LEFT:LEFT + REGION_W]
    for photometric, pixels in (("YBR_FULL", full), ("YBR_FULL_422", packed)):
        path = _save(_dataset(photometric, samples=3), tmp_path / f"{photometric}.dcm", pixels=pixels)
        np.testing.assert_array_equal(read_dicom_instance(path).frames, crop, err_msg=photometric)


def test_palette_colour_gray_is_the_luma_of_its_entries(tmp_path):
    rng = np.random.default_rng(6)
    entries = rng.integers(0, 256, (256, 3), np.uint8)  # 8-bit colours, stored as 16-bit LUT values v * 257
    ds = _dataset("PALETTE COLOR")
    for channel, name in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", (entries[:, channel].astype(np.uint16) * 257).tobytes())
    indices = rng.integers(0, 256, (T, REGION_H, REGION_W), np.uint8)
    path = _save(ds, tmp_path / "palette.dcm", pixels=_canvas(indices))
    expected = np.stack([np.asarray(Image.fromarray(entries[f]).convert("L")) for f in indices])
    np.testing.assert_array_equal(read_dicom_instance(path).frames, expected)


# ---------------------------------------------------------------------------------------------- region, spacing


def test_largest_b_mode_region_is_cropped_and_gives_spacing(tmp_path):
    canvas = np.random.default_rng(7).integers(0, 256, (T, ROWS, COLS), np.uint8)
    regions = [_region_item(0, 0, 10, 10, delta=(0.1, 0.1)),  # a small B-mode thumbnail
               _region_item(10, 0, ROWS - 10, COLS, data_type=3, delta=(0.2, 0.2)),  # larger, spectral Doppler
               _region_item(12, 20, 40, 50, delta=(0.05, 0.04)),  # the largest B-mode region
               _region_item(5, 5, 20, 20, delta=(0.3, 0.3))]
    path = _save(_dataset(regions=regions), tmp_path / "r.dcm", pixels=canvas)
    instance = read_dicom_instance(path)
    assert instance.region == (12, 20, 52, 70)
    np.testing.assert_array_equal(instance.frames, canvas[:, 12:52, 20:70])
    assert instance.spacing_mm == pytest.approx((0.4, 0.5))  # (row from DeltaY, col from DeltaX), cm -> mm
    assert instance.notes == ()


def test_region_past_the_frame_is_clipped(tmp_path):
    canvas = np.random.default_rng(8).integers(0, 256, (T, ROWS, COLS), np.uint8)
    path = _save(_dataset(regions=[_region_item(40, 50, 100, 100)]), tmp_path / "r.dcm", pixels=canvas)
    np.testing.assert_array_equal(read_dicom_instance(path).frames, canvas[:, 40:, 50:])


def test_spacing_falls_back_to_pixel_spacing_then_none(tmp_path):
    canvas = _canvas(_gray_frames())
    seconds = [_region_item(TOP, LEFT, REGION_H, REGION_W, units=4)]
    with_fallback = read_dicom_instance(_save(_dataset(regions=seconds, PixelSpacing=[0.3, 0.25]),
                                              tmp_path / "a.dcm", pixels=canvas))
    assert with_fallback.spacing_mm == pytest.approx((0.3, 0.25))
    assert "PixelSpacing" in with_fallback.spacing_note and "seconds" in with_fallback.spacing_note
    without = read_dicom_instance(_save(_dataset(regions=seconds), tmp_path / "b.dcm", pixels=canvas))
    assert without.spacing_mm is None and "seconds, not cm" in without.spacing_note
    assert without.frames.shape == (T, REGION_H, REGION_W)  # still cropped: units do not change the region


def test_no_region_keeps_the_whole_frame_with_a_note(tmp_path):
    canvas = _canvas(_gray_frames())
    instance = read_dicom_instance(_save(_dataset(regions=[]), tmp_path / "n.dcm", pixels=canvas))
    np.testing.assert_array_equal(instance.frames, canvas)
    assert instance.spacing_mm is None and "no 2-D B-mode region" in instance.spacing_note
    assert len(instance.notes) == 1 and "not cropped" in instance.notes[0]


# ---------------------------------------------------------------------------------------------- headers


def test_header_read_stops_before_the_pixel_data(tmp_path):
    ds = _dataset(SeriesNumber=3, InstanceNumber=7, AcquisitionDate="20260102", AcquisitionTime="101500")
    path = _save(ds, tmp_path / "h.dcm", pixels=_canvas(_gray_frames()))
    data = open(path, "rb").read()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:len(data) - ROWS * COLS * 2])  # two frames short: a full read must fail
    header = read_dicom_header(str(cut))
    assert (header.study_uid, header.sop_uid, header.series_uid) == (ds.StudyInstanceUID, ds.SOPInstanceUID,
                                                                      ds.SeriesInstanceUID)
    assert (header.series_number, header.instance_number, header.acquisition) == (3, 7, "20260102101500")
    assert (header.frames, header.rows, header.columns, header.source) == (T, ROWS, COLS, str(cut))
    with pytest.raises(errors.TruncatedFileError):
        read_dicom_instance(str(cut))


def test_sweep_order_is_series_instance_then_time(tmp_path):
    specs = [(2, 1, "20260101090000"), (1, 2, "20260101080000"), (1, 1, "20260101100000"),
             (1, 2, "20260101070000"), (None, 1, "")]
    headers = []
    for i, (series, instance, time) in enumerate(specs):
        ds = _dataset(InstanceNumber=instance, AcquisitionDateTime=time)
        if series is None:
            del ds.SeriesNumber
        else:
            ds.SeriesNumber = series
        headers.append(read_dicom_header(_save(ds, tmp_path / f"{i}.dcm", pixels=_canvas(_gray_frames()))))
    ordered = [specs.index(next(s for s in specs if (s[0], s[1], s[2]) == (h.series_number, h.instance_number,
                                                                            h.acquisition)))
               for h in sorted(headers, key=lambda h: h.sort_key())]
    assert ordered == [2, 3, 1, 0, 4]


def test_memory_url_is_read_like_a_local_file(tmp_path):
    gray = _gray_frames()
    path = _save(_dataset(), tmp_path / "m.dcm", RLELossless, _canvas(gray))
    url = "memory://fetaliqa-dicom-test/study/instance-1"
    fsspec.filesystem("memory").pipe_file(url, open(path, "rb").read())
    try:
        assert read_dicom_header(url).source == url
        np.testing.assert_array_equal(read_dicom_instance(url).frames, gray)
    finally:
        fsspec.filesystem("memory").rm("memory://fetaliqa-dicom-test", recursive=True)


# ---------------------------------------------------------------------------------------------- bad files


def _assert_one_line(err: pytest.ExceptionInfo, source: str, *words: str) -> None:
    text = str(err.value)
    assert text.startswith(f"{source}: ") and "\n" not in text
    for word in words:
        assert word in text


def test_not_dicom_and_empty(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not an image " * 20)
    mha = tmp_path / "stack"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 8), np.uint8)), str(tmp_path / "s.mha"))
    mha.write_bytes((tmp_path / "s.mha").read_bytes())
    for path in (text, mha):
        for read in (read_dicom_header, read_dicom_instance):
            with pytest.raises(errors.NotDicomError) as err:
                read(str(path))
            _assert_one_line(err, str(path), "DICM")
            assert err.value.kind == "not_dicom"
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(errors.EmptyFileError):
        read_dicom_instance(str(empty))


@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom's own warning; the check does not use it
def test_truncated_encapsulated_pixel_data(tmp_path):
    path = _save(_dataset(), tmp_path / "j.dcm", JPEGLSLossless, _canvas(_gray_frames()))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(errors.TruncatedFileError) as err:
        read_dicom_instance(str(cut))
    _assert_one_line(err, str(cut), "truncated pixel data")
    assert err.value.kind == "truncated"


def test_no_pixel_data(tmp_path):
    path = _save(_dataset(), tmp_path / "none.dcm")
    with pytest.raises(errors.NoPixelDataError) as err:
        read_dicom_instance(path)
    _assert_one_line(err, path, "no pixel data")
    assert err.value.kind == "no_pixel_data"


def test_unsupported_transfer_syntax_is_named(tmp_path):
    mpeg4 = pydicom.uid.MPEG4HP41
    path = _encapsulated(_dataset(), tmp_path / "video.dcm", mpeg4, [b"\x00\x00\x01\xb3" + bytes(60)])
    with pytest.raises(errors.UnsupportedTransferSyntaxError) as err:
        read_dicom_instance(path)
    _assert_one_line(err, path, mpeg4.name, str(mpeg4))
    assert err.value.kind == "unsupported_transfer_syntax"


def test_unsupported_photometric_and_sample_depth(tmp_path):
    path = _save(_dataset("HSV", samples=3), tmp_path / "hsv.dcm", pixels=np.zeros((T, ROWS, COLS, 3), np.uint8))
    with pytest.raises(errors.UnsupportedPhotometricError) as err:
        read_dicom_instance(path)
    _assert_one_line(err, path, "'HSV'")
    assert err.value.kind == "unsupported_photometric"
    deep = _save(_dataset(bits=16), tmp_path / "deep.dcm", pixels=np.zeros((T, ROWS, COLS), np.uint16))
    with pytest.raises(errors.BadDtypeError) as err:
        read_dicom_instance(deep)
    _assert_one_line(err, deep, "16 bits")


def test_missing_study_uid(tmp_path):
    ds = _dataset()
    del ds.StudyInstanceUID
    path = _save(ds, tmp_path / "anon.dcm", pixels=_canvas(_gray_frames()))
    with pytest.raises(errors.DicomHeaderError) as err:
        read_dicom_header(path)
    _assert_one_line(err, path, "StudyInstanceUID")


@pytest.mark.parametrize("uid, valid", [
    ("1.2.840.10008.1.2.4.80", True), ("0.1.0", True), ("2.25." + "9" * 59, True),  # 64 characters
    ("2.25." + "9" * 60, False), ("1.02.3", False), ("1..2", False), (".1.2", False), ("1.2.", False), ("", False),
    ("1.2.3\n", False), ("1.2.840/../../x", False), ("1.2.a", False), ("1.2 .3", False), ("-1.2", False)])
def test_uid_rules_of_ps3_5(uid, valid):
    assert is_valid_uid(uid) is valid


@pytest.mark.filterwarnings("ignore:.*VR UI")  # pydicom warns of the bad UID it writes and reads back
def test_a_bad_study_uid_is_refused_showing_it_safely(tmp_path):
    for name, uid, shown in (("dots.dcm", "1.2..3", "'1.2..3'"),
                             ("path.dcm", "1.2.840/../../" + "x" * 90, "'1.2.840/../../" + "x" * 62 + "...")):
        path = _save(_dataset(StudyInstanceUID=uid), tmp_path / name, pixels=_canvas(_gray_frames()))
        for read in (read_dicom_header, read_dicom_instance):
            with pytest.raises(errors.BadUidError) as err:
                read(path)
            _assert_one_line(err, path, f"StudyInstanceUID {shown} is not a DICOM UID")
            assert err.value.kind == "bad_uid" and (len(uid) < 80 or uid not in str(err.value))  # shown cut short


def test_an_instance_declaring_a_terabyte_is_refused_before_decoding(tmp_path):
    """A header declaring 2,500,000 frames of 562 x 744 (~1 TB) over a body of 3 small frames: refused from the
    header (`too_large`, naming the size); without the check the read would size its frames from it."""
    ds = _dataset()
    path = _save(ds, tmp_path / "small.dcm", pixels=_canvas(_gray_frames()))
    crafted = pydicom.dcmread(path)
    crafted.NumberOfFrames, crafted.Rows, crafted.Columns = 2_500_000, 562, 744
    crafted.save_as(tmp_path / "crafted.dcm", enforce_file_format=True)
    uri = str(tmp_path / "crafted.dcm")
    assert read_dicom_header(uri).decoded_bytes() == 2_500_000 * 562 * 744  # the header alone reads fine
    with pytest.raises(errors.TooLargeError) as err:
        read_dicom_instance(uri, max_bytes=3 << 29)
    _assert_one_line(err, uri, "decoded size 973.5 GiB (2500000 frames x 562 x 744 x 1 byte) over --max-case-gib 1.5")
    assert err.value.kind == "too_large"

    # The size counts every sample: 3 RGB frames fit a limit of exactly their size, not one byte less.
    rgb = _save(_dataset("RGB", samples=3), tmp_path / "rgb.dcm", pixels=_canvas(np.stack([_gray_frames()] * 3, -1)))
    size = T * ROWS * COLS * 3
    assert read_dicom_instance(rgb, max_bytes=size).frames.shape == (T, REGION_H, REGION_W)
    with pytest.raises(errors.TooLargeError) as err:
        read_dicom_instance(rgb, max_bytes=size - 1)
    _assert_one_line(err, rgb, f"{T} frames x {ROWS} x {COLS} x 3 samples x 1 byte) over --max-case-gib")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # pydicom's, writing the invalid dates on purpose
@pytest.mark.parametrize("study_date, expected", [("20250216", "2025-02-16"), ("2025-02-16", None),
                                                  ("20251332", None), ("garbage", None), ("", None), (None, None)])
def test_the_header_carries_the_study_context_and_a_valid_date_only(tmp_path, study_date, expected):
    context = {"InstitutionName": "Example Maternity Unit ", "StationName": "US-ROOM-3", "Manufacturer": "Acme",
               "ManufacturerModelName": "Sono 9", "OperatorsName": "Doe^Jane"}
    ds = _dataset(**context, **({} if study_date is None else {"StudyDate": study_date}))
    path = _save(ds, tmp_path / "one.dcm", pixels=_canvas(_gray_frames()))
    for header in (read_dicom_header(path), read_dicom_instance(path).header):
        assert (header.study_date, header.institution, header.station, header.manufacturer, header.device_model) == (
            expected, "Example Maternity Unit", "US-ROOM-3", "Acme", "Sono 9")
        assert "Doe" not in repr(header)  # operator names are never read
    bare = read_dicom_header(_save(_dataset(), tmp_path / "bare.dcm", pixels=_canvas(_gray_frames())))
    assert (bare.study_date, bare.institution, bare.station, bare.manufacturer, bare.device_model) == (None,) * 5


def test_a_dicomdir_is_known_by_its_sop_class_whatever_its_name(tmp_path):
    from pydicom.fileset import FileSet

    ds = _dataset(StudyDate="20260101", StudyTime="090000", StudyID="1", PatientID="P1")
    file_set = FileSet()
    file_set.add(pydicom.dcmread(_save(ds, tmp_path / "one.dcm", pixels=_canvas(_gray_frames()))))
    file_set.write(tmp_path / "set")
    index = tmp_path / "INDEX"
    index.write_bytes((tmp_path / "set" / "DICOMDIR").read_bytes())
    for read in (read_dicom_header, read_dicom_instance):
        with pytest.raises(errors.DicomDirectoryError) as err:
            read(str(index))
        _assert_one_line(err, str(index), "DICOMDIR", "not an image")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's warnings about the cut files, from every thread
def test_header_reads_from_many_threads_leave_the_warning_filters_alone(tmp_path):
    """As the listing reads headers, from 32 threads, over good files and files whose parse makes pydicom warn
    (cut inside the Sequence of Ultrasound Regions; cut inside encapsulated pixel data): `warnings.filters` is
    never replaced or changed while they run (a `catch_warnings` per read would replace it, in every thread),
    and each result is that of a read alone."""
    expected = {}
    for i in range(8):
        ds = _dataset(InstanceNumber=i + 1)
        path = _save(ds, tmp_path / f"good{i}.dcm", JPEGLSLossless, _canvas(_gray_frames(i)))
        expected[path] = ("ok", ds.StudyInstanceUID)
    data = open(path, "rb").read()
    regions = data.index(b"\x18\x00\x11\x60")  # (0018,6011): the Sequence of Ultrasound Regions
    for name, keep, outcome in (("cut-in-regions.dcm", regions + 40, ("dicom_header", None)),
                                ("cut-in-pixels.dcm", len(data) - 40, ("ok", ds.StudyInstanceUID))):
        (tmp_path / name).write_bytes(data[:keep])
        expected[str(tmp_path / name)] = outcome

    def read(uri: str) -> tuple[str, str | None]:
        try:
            return "ok", read_dicom_header(uri).study_uid
        except errors.InputError as err:
            return err.kind, None

    filters, snapshot = warnings.filters, list(warnings.filters)
    seen, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            if warnings.filters is not filters or warnings.filters != snapshot:
                seen.append(list(warnings.filters))
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            uris = list(expected) * 40
            results = list(pool.map(read, uris))
    finally:
        done.set()
        watcher.join()
    assert not seen, "warnings.filters changed while headers were read"
    assert warnings.filters is filters and warnings.filters == snapshot
    assert results == [expected[uri] for uri in uris]


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_dicom_archive_holds_the_synthetic_cases(tmp_path):
    k, height, width = 2, 40, 48
    assert synth_main([str(tmp_path), "--cases", "2", "--frames-per-sweep", str(k), "--height", str(height),
                       "--width", str(width), "--seed", "3", "--format", "dicom"]) == 0
    cases = {study_uid_of(c.case_id): c for c in synthetic_cases(2, k, height, width, 3)}
    files = sorted((tmp_path / "dicom").iterdir())
    assert len(files) == 2 * layout.SWEEPS_PER_CASE
    syntaxes, photometrics = set(), set()
    top, left, bottom, right = region_box(height, width)
    for path in files:
        ds = pydicom.dcmread(path)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        photometrics.add(ds.PhotometricInterpretation)
        stored = ds.pixel_array
        assert stored[:, :BANNER_ROWS].max() > 200  # burned-in text in the banner, outside the region
        instance = read_dicom_instance(str(path))
        sweep = instance.header.instance_number
        expected = cases[instance.header.study_uid].image[(sweep - 1) * k: sweep * k]
        np.testing.assert_array_equal(instance.frames, expected)
        assert instance.region == (top, left, bottom, right) and instance.spacing_mm == pytest.approx((0.28, 0.28))
    assert syntaxes == {s for s, _ in SWEEP_ENCODINGS} and photometrics == {"MONOCHROME2", "RGB"}
    for study, case in cases.items():
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / layout.MASKS_DIR / f"{study}.mha")))
        np.testing.assert_array_equal(mask, case.mask)
    with open(tmp_path / layout.CIRCUMFERENCES_CSV) as f:
        assert {row["uuid"] for row in csv.DictReader(f)} == set(cases)
    # Studies come from different sites and months, so that a report can group by them.
    headers = [read_dicom_header(str(path)) for path in files]
    assert len({h.institution for h in headers}) == 2 and len({h.study_date[:7] for h in headers}) == 2
    assert all(h.station and h.manufacturer and h.device_model for h in headers)
