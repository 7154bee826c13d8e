"""Archive listing and reading on real files written with SimpleITK (local paths and memory://)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import SimpleITK as sitk

from fetaliqa import errors
from fetaliqa.inputs import stacks
from fetaliqa.inputs import layout
from fetaliqa.inputs.cases import read_case
from fetaliqa.inputs.listing import CaseRef, list_cases

T, H, W = 12, 40, 50
FOV_MASK = Path(__file__).resolve().parents[2] / "shared" / "reference" / "acouslic_fov_mask.mha"


def write_stack(path, array, spacing=(0.28, 0.28), compress=True, is_vector=False):
    """Write `array` ((T, H, W) numpy, frame axis first) with (row, col) `spacing` in mm; return str(path)."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if image.GetDimension() >= 2:
        image.SetSpacing((spacing[1], spacing[0]) + (1.0,) * (image.GetDimension() - 2))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return str(path)


@pytest.fixture()
def frames():
    return np.random.default_rng(0).integers(0, 256, (T, H, W), dtype=np.uint8)


@pytest.fixture()
def memory_root():
    """A fresh memory:// folder, removed afterwards (the in-memory filesystem is process-global)."""
    root = f"memory://fetaliqa-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def make_layout(root: Path, ids, with_masks=(), frames=None, suffix=".mha"):
    frames = frames if frames is not None else np.zeros((T, H, W), np.uint8)
    (root / layout.IMAGES_DIR).mkdir(parents=True)
    (root / layout.MASKS_DIR).mkdir(parents=True)
    for case_id in ids:
        write_stack(root / layout.IMAGES_DIR / f"{case_id}{suffix}", frames)
        if case_id in with_masks:
            write_stack(root / layout.MASKS_DIR / f"{case_id}{suffix}", np.zeros((T, H, W), np.uint8))
    return root


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "name, compress",
    [("c.mha", True), ("u.mha", False), ("c.nii.gz", True), ("u.nii", False), ("c.nrrd", True),
     ("u.nrrd", False)],
)
def test_each_format_reads_back(tmp_path, frames, name, compress):
    uri = write_stack(tmp_path / name, frames, spacing=(0.28, 0.31), compress=compress)
    stack = stacks.read_image_stack(uri)
    assert stack.frames.shape == (T, H, W) and stack.frames.dtype == np.uint8
    assert stack.frames.flags.c_contiguous
    np.testing.assert_array_equal(stack.frames, frames)
    assert stack.spacing_mm == pytest.approx((0.28, 0.31), abs=1e-6)  # (row, col); NIfTI stores float32
    assert stack.source == uri


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"], ids=["fast MetaImage path", "SimpleITK"])
def test_frames_are_the_decoded_buffer_and_outlive_the_reader(tmp_path, frames, suffix):
    """No copy after decoding: the MetaImage fast path hands over the array libdeflate wrote into; SimpleITK's
    path a view of the image's own buffer, which the array keeps alive after the reader is gone."""
    import gc

    stack = stacks.read_image_stack(write_stack(tmp_path / f"a{suffix}", frames))
    gc.collect()  # nothing but the array holds SimpleITK's image now
    assert stack.frames.flags.owndata == (suffix == ".mha") and stack.frames.flags.writeable
    np.testing.assert_array_equal(stack.frames, frames)
    stack.frames[0, 0, 0] = 7  # private to this Stack, so writing is allowed
    assert stack.frames[0, 0, 0] == 7


def test_multi_member_nifti_gz_is_not_mistaken_for_truncated(tmp_path, frames):
    import gzip

    raw = Path(write_stack(tmp_path / "a.nii", frames, compress=False)).read_bytes()
    half = len(raw) // 2
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    np.testing.assert_array_equal(stacks.read_image_stack(str(tmp_path / "b.nii.gz")).frames, frames)


def test_read_from_memory_url(memory_root, tmp_path, frames):
    local = write_stack(tmp_path / "a.nii.gz", frames)
    uri = f"{memory_root}/a.nii.gz"
    fsspec.filesystem("memory").pipe(uri, Path(local).read_bytes())
    stack = stacks.read_image_stack(uri)
    np.testing.assert_array_equal(stack.frames, frames)
    assert stack.source == uri


# ------------------------------------------------------------------------------------------- listing


def test_list_layout_with_some_masks(tmp_path):
    root = make_layout(tmp_path / "root", ["c", "a", "b"], with_masks={"a", "c"})
    cases = list_cases(str(root))
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    assert cases[0] == CaseRef("a", f"{root}/{layout.IMAGES_DIR}/a.mha", None, f"{root}/{layout.MASKS_DIR}/a.mha")
    assert cases[1].mask_uri is None
    assert cases[2].mask_uri == f"{root}/{layout.MASKS_DIR}/c.mha"


def test_list_layout_without_masks_folder(tmp_path):
    root = make_layout(tmp_path / "root", ["x", "y"])
    (root / layout.MASKS_DIR).rmdir()
    cases = list_cases(str(root) + "/")
    assert [(c.case_id, c.mask_uri) for c in cases] == [("x", None), ("y", None)]


def test_list_layout_mask_found_by_case_id(tmp_path):
    root = make_layout(tmp_path / "root", ["a"], suffix=".nii.gz")
    write_stack(root / layout.MASKS_DIR / "a.mha", np.zeros((T, H, W), np.uint8))
    assert list_cases(str(root))[0].mask_uri == f"{root}/{layout.MASKS_DIR}/a.mha"
    write_stack(root / layout.MASKS_DIR / "a.nrrd", np.zeros((T, H, W), np.uint8))
    with pytest.raises(errors.InputError, match=r"two masks for case 'a': a\.mha and a\.nrrd"):
        list_cases(str(root))


def test_list_bare_folder_of_mixed_formats(tmp_path, frames):
    for name in ["b.nii.gz", "a.mha", "c.nrrd"]:
        write_stack(tmp_path / name, frames)
    (tmp_path / "notes.csv").write_text("x")
    (tmp_path / ".hidden.mha").write_text("x")
    (tmp_path / "sub").mkdir()
    write_stack(tmp_path / "sub" / "d.mha", frames)
    cases = list_cases(str(tmp_path))
    assert [(c.case_id, os.path.basename(c.source), c.mask_uri) for c in cases] == [
        ("a", "a.mha", None), ("b", "b.nii.gz", None), ("c", "c.nrrd", None)
    ]
    assert cases[0].source == f"{tmp_path}/a.mha"


def test_list_text_file(tmp_path):
    listing = tmp_path / "lists" / "cases.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# archive of 2025\n\ns3://bucket/x/z.mha\n  rel/y.nii.gz  \n/abs/path/a.nrrd\n# done\n"
    )
    cases = list_cases(str(listing))
    assert cases == [
        CaseRef("a", "/abs/path/a.nrrd"),
        CaseRef("y", f"{listing.parent}/rel/y.nii.gz"),
        CaseRef("z", "s3://bucket/x/z.mha"),
    ]


def test_list_text_file_rejects_non_images(tmp_path):
    listing = tmp_path / "cases.txt"
    listing.write_text("a.mha\nb.png\n")
    with pytest.raises(errors.InputError, match=r"cases\.txt: 1 listed file\(s\) unusable, the first: .*b\.png: "):
        list_cases(str(listing))


def test_list_memory_url_keeps_scheme(memory_root, tmp_path):
    local = make_layout(tmp_path / "root", ["a", "b"], with_masks={"b"})
    fs = fsspec.filesystem("memory")
    for path in local.rglob("*.mha"):
        fs.pipe(f"{memory_root}/{path.relative_to(local).as_posix()}", path.read_bytes())
    cases = list_cases(memory_root)
    assert cases == [
        CaseRef("a", f"{memory_root}/{layout.IMAGES_DIR}/a.mha"),
        CaseRef("b", f"{memory_root}/{layout.IMAGES_DIR}/b.mha", None, f"{memory_root}/{layout.MASKS_DIR}/b.mha"),
    ]
    stack, mask = read_case(cases[1], with_mask=True)
    assert stack.frames.shape == mask.shape == (T, H, W)
    # a bare memory:// prefix and a list stored in memory
    assert [c.source for c in list_cases(f"{memory_root}/{layout.IMAGES_DIR}")] == [
        c.source for c in cases
    ]
    fs.pipe(f"{memory_root}/list.txt", b"images/stacked_fetal_ultrasound/b.mha\n")
    assert list_cases(f"{memory_root}/list.txt") == [cases[1]]  # the list's folder is the root: b's mask found


def test_list_duplicate_case_ids(tmp_path, frames):
    write_stack(tmp_path / "a.mha", frames)
    write_stack(tmp_path / "a.nii.gz", frames)
    with pytest.raises(errors.InputError, match="duplicate case id 'a'"):
        list_cases(str(tmp_path))
    listing = tmp_path / "l.txt"
    listing.write_text("x/a.mha\ny/a.mha\n")
    with pytest.raises(errors.InputError, match="duplicate case id 'a'"):
        list_cases(str(listing))


@pytest.mark.parametrize("what", ["empty folder", "missing path", "empty list", "missing list"])
def test_list_nothing_found(tmp_path, what):
    url = {
        "empty folder": str(tmp_path),
        "missing path": str(tmp_path / "nope"),
        "empty list": str(tmp_path / "l.txt"),
        "missing list": str(tmp_path / "missing.txt"),
    }[what]
    if what == "empty list":
        Path(url).write_text("# nothing yet\n")
    with pytest.raises(errors.MissingObjectError) as info:
        list_cases(url)
    assert str(info.value).startswith(url + ": ")


def test_list_empty_memory_prefix(memory_root):
    with pytest.raises(errors.MissingObjectError, match="fetaliqa-test"):
        list_cases(memory_root)


# ------------------------------------------------------------------------------------------- bad input


def _cut(path, keep):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: keep if keep >= 0 else len(data) // 2])
    return str(path)


def _bad_input(tmp_path, kind):
    """Build one bad input file; return (uri, expected error class, expected message fragment)."""
    p = tmp_path / "case.mha"
    good = np.zeros((T, H, W), np.uint8)
    if kind.startswith("truncated"):
        name = kind.split(" ")[1]
        p = tmp_path / f"case{name}"
        uri = write_stack(p, np.random.default_rng(1).integers(0, 256, (T, H, W), dtype=np.uint8),
                          compress=name in (".mha", ".nii.gz"))
        return _cut(uri, -1), errors.TruncatedFileError, "truncated or corrupt image data"
    if kind == "cut in header":
        return _cut(write_stack(p, good), 30), errors.TruncatedFileError, "truncated or corrupt image header"
    if kind == "text named .mha":
        p.write_text("hello\nthis is not an image\n")
        return str(p), errors.NotAnImageError, "not an image"
    if kind == "empty":
        p.write_bytes(b"")
        return str(p), errors.EmptyFileError, "empty"
    if kind == "missing":
        return str(p), errors.MissingObjectError, "no such file"
    if kind == "2-D":
        return write_stack(p, good[0]), errors.BadShapeError, "2-D image of shape 40 x 50"
    if kind == "4-D":
        uri = write_stack(p, np.zeros((2, T, H, W), np.uint8))
        return uri, errors.BadShapeError, "4-D image of shape 2 x 12 x 40 x 50"
    if kind == "RGB":
        rgb = np.zeros((T, H, W, 3), np.uint8)
        return write_stack(p, rgb, is_vector=True), errors.BadDtypeError, "3 components per pixel"
    if kind == "negative floats":
        uri = write_stack(p, good.astype(np.float32) - 2.5)
        return uri, errors.BadDtypeError, "float32 with values in [-2.5, -2.5]"
    if kind == "above 255":
        uri = write_stack(p, good.astype(np.int16) + 300)
        return uri, errors.BadDtypeError, "int16 with values in [300, 300]"
    if kind == "NaN":
        a = good.astype(np.float64)
        a[3, 4, 5] = np.nan
        return write_stack(p, a), errors.BadDtypeError, "float64 with values in [nan"
    if kind == "10 frames":
        return write_stack(p, good[:10]), errors.BadFrameCountError, "10 frames is not a multiple of 6"
    raise AssertionError(kind)


BAD_KINDS = [
    "truncated .mha", "truncated .nii.gz", "truncated .nii", "truncated .nrrd", "cut in header",
    "text named .mha", "empty", "missing", "2-D", "4-D", "RGB", "negative floats", "above 255", "NaN",
    "10 frames",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_image_raises_specific_error(tmp_path, kind):
    uri, expected, fragment = _bad_input(tmp_path, kind)
    with pytest.raises(errors.InputError) as info:
        stacks.read_image_stack(uri)
    err = info.value
    assert type(err) is expected, f"{kind}: {type(err).__name__}: {err}"
    message = str(err)
    assert "\n" not in message and message.startswith(f"{uri}: ")
    assert os.path.basename(uri) in message and fragment in message
    assert "/tmp/fetaliqa-" not in message  # never the temporary copy


def test_a_header_declaring_a_terabyte_is_refused_before_any_allocation(tmp_path):
    """A crafted MetaImage: DimSize 744 x 562 x 2,500,002 (~1 TB of uint8; a whole number of frames a sweep, so that
    no other check comes first) over a 100-byte body. The size from the header is refused (`too_large`, naming
    it) by both readers; decoding would ask SimpleITK for the terabyte."""
    path = tmp_path / "crafted.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 744 562 2500002\nElementType = MET_UCHAR\n"
                     b"ElementDataFile = LOCAL\n" + bytes(100))
    for read in (stacks.read_image_stack, lambda uri, max_bytes: stacks.read_mask_stack(uri, max_bytes=max_bytes)):
        with pytest.raises(errors.TooLargeError) as info:
            read(str(path), max_bytes=3 << 29)
        assert str(info.value) == (f"{path}: decoded size 973.5 GiB (2500002 frames x 562 x 744 x 1 byte) "
                                   "over --max-case-gib 1.5")
        assert info.value.kind == "too_large"


def test_the_decoded_size_counts_every_byte_of_the_pixel_type(tmp_path):
    values = np.random.default_rng(2).integers(0, 256, (T, H, W)).astype(np.float64)
    uri = write_stack(tmp_path / "f.mha", values)
    size = T * H * W * 8
    np.testing.assert_array_equal(stacks.read_image_stack(uri, max_bytes=size).frames, values.astype(np.uint8))
    with pytest.raises(errors.TooLargeError, match=rf"\({T} frames x {H} x {W} x 8 bytes\) over --max-case-gib"):
        stacks.read_image_stack(uri, max_bytes=size - 1)


def test_truncated_remote_copy_names_the_url(memory_root, tmp_path, frames):
    local = _cut(write_stack(tmp_path / "a.mha", frames), -1)
    uri = f"{memory_root}/a.mha"
    fsspec.filesystem("memory").pipe(uri, Path(local).read_bytes())
    with pytest.raises(errors.TruncatedFileError, match=f"^{uri}: truncated"):
        stacks.read_image_stack(uri)


@pytest.mark.skipif(not FOV_MASK.exists(), reason="shared reference FOV mask not present")
def test_real_acouslic_fov_mask_is_2d():
    with pytest.raises(errors.BadShapeError, match="2-D image of shape 562 x 744"):
        stacks.read_image_stack(str(FOV_MASK))


# ------------------------------------------------------------------------------------------- pixel rule


def test_float_in_unit_range_is_scaled(tmp_path):
    values = np.random.default_rng(2).random((T, H, W)).astype(np.float32)
    values[0, 0, :2] = (0.0, 1.0)
    stack = stacks.read_image_stack(write_stack(tmp_path / "f.nrrd", values))
    np.testing.assert_array_equal(stack.frames, np.rint(values * np.float32(255)).astype(np.uint8))
    assert stack.frames[0, 0, :2].tolist() == [0, 255]


def test_float_in_gray_range_is_rounded(tmp_path):
    values = np.random.default_rng(3).uniform(0, 255, (T, H, W))
    values[0, 0, :3] = (0.4, 254.6, 1.5)
    stack = stacks.read_image_stack(write_stack(tmp_path / "f.mha", values))
    np.testing.assert_array_equal(stack.frames, np.rint(values).astype(np.uint8))
    assert stack.frames[0, 0, :3].tolist() == [0, 255, 2]


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32])
def test_other_integers_in_gray_range_are_cast_not_scaled(tmp_path, dtype):
    values = np.random.default_rng(4).integers(0, 2, (T, H, W)).astype(dtype)  # 0/1 stays 0/1
    values[1, 1, 1] = 255
    stack = stacks.read_image_stack(write_stack(tmp_path / "i.mha", values))
    np.testing.assert_array_equal(stack.frames, values.astype(np.uint8))


# ------------------------------------------------------------------------------------------- masks


@pytest.fixture()
def image_stack(tmp_path, frames):
    return stacks.read_image_stack(write_stack(tmp_path / "img.mha", frames))


def test_mask_reads_back(tmp_path, image_stack):
    labels = np.random.default_rng(5).integers(0, 3, (T, H, W), dtype=np.uint8)
    mask = stacks.read_mask_stack(write_stack(tmp_path / "m.mha", labels), image_stack)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, labels)


def test_float_mask_with_labels_is_accepted(tmp_path, image_stack):
    labels = np.random.default_rng(6).integers(0, 3, (T, H, W)).astype(np.float32)
    mask = stacks.read_mask_stack(write_stack(tmp_path / "m.nii.gz", labels), image_stack)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, labels.astype(np.uint8))


@pytest.mark.parametrize("shape", [(T, H, W + 1), (T - 6, H, W), (H, W)])
def test_mask_shape_mismatch(tmp_path, image_stack, shape):
    uri = write_stack(tmp_path / "m.mha", np.zeros(shape, np.uint8))
    with pytest.raises(errors.MaskMismatchError) as info:
        stacks.read_mask_stack(uri, image_stack)
    message = str(info.value)
    assert message.startswith(f"{uri}: ") and "12 x 40 x 50" in message
    assert f"mask shape {' x '.join(map(str, shape))} differs" in message


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_mask_bad_values_are_listed(tmp_path, image_stack, dtype):
    labels = np.zeros((T, H, W), dtype)
    labels[0, 0, 0], labels[5, 5, 5], labels[6, 6, 6] = 7, 3, 3
    uri = write_stack(tmp_path / "m.mha", labels)
    with pytest.raises(errors.BadMaskValuesError, match=r"m\.mha: mask values outside \{0, 1, 2\}: 3, 7"):
        stacks.read_mask_stack(uri, image_stack)


def test_read_case_with_and_without_mask(tmp_path):
    root = make_layout(tmp_path / "root", ["a", "b"], with_masks={"a"})
    a, b = list_cases(str(root))
    stack, mask = read_case(a, with_mask=True)
    assert stack.frames.shape == mask.shape == (T, H, W)
    assert read_case(b)[1] is None
    with pytest.raises(errors.MissingMaskError) as info:
        read_case(b, with_mask=True)
    assert str(info.value).startswith(f"{b.source}: no mask for case 'b'")


def test_read_case_missing_mask_object(tmp_path):
    root = make_layout(tmp_path / "root", ["a"], with_masks={"a"})
    case = list_cases(str(root))[0]
    os.remove(case.mask_uri)
    with pytest.raises(errors.MissingObjectError, match=f"^{case.mask_uri}: "):
        read_case(case, with_mask=True)


# ------------------------------------------------------------------------------------------- csv

HEADER = ",".join(layout.CSV_COLUMNS)


def write_csv(root: Path, text: str) -> str:
    path = root / layout.CIRCUMFERENCES_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_circumferences_read(tmp_path):
    write_csv(tmp_path, f"{HEADER}\nu1,s1,,150.5,,,NaN,\n\nu2,s2,1,2,3,4,5,6\n")
    result = stacks.read_circumferences(str(tmp_path))
    assert result == {"u1": [None, 150.5, None, None, None, None], "u2": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}


def test_circumferences_column_order_and_direct_url(memory_root):
    columns = list(layout.CSV_COLUMNS)[::-1] + ["note"]
    text = ",".join(columns) + "\n" + ",".join(["6", "5", "4", "3", "2", "1", "s", "u", "hello"]) + "\n"
    url = f"{memory_root}/ac.csv"
    fsspec.filesystem("memory").pipe(url, ("\ufeff" + text).encode())  # with a BOM, as Excel writes it
    assert stacks.read_circumferences(url) == {"u": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}


ROW = "u1,s1,1,2,3,4,5,6"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("uuid,subject_id,sweep_1_ac_mm\n" + ROW, "line 1: header lacks column(s) sweep_2_ac_mm"),
        (ROW + "\n" + ROW, "line 1: header lacks column(s) uuid"),
        (f"{HEADER}\n{ROW}\nu2,s2,1,2\n", "line 3: expected 8 fields, found 4"),
        (f"{HEADER}\n{ROW}\nu2,s2,1,2,3,4,5,6,7\n", "line 3: expected 8 fields, found 9"),
        (f"{HEADER}\nu2,s2,1,abc,3,4,5,6\n", "line 2: column sweep_2_ac_mm: 'abc' is not a circumference"),
        (f"{HEADER}\nu2,s2,1,2,3,4,5,-6\n", "line 2: column sweep_6_ac_mm: '-6'"),
        (f"{HEADER}\nu2,s2,inf,2,3,4,5,6\n", "line 2: column sweep_1_ac_mm: 'inf'"),
        (f"{HEADER}\n{ROW}\n\n{ROW}\n", "line 4: uuid u1 repeats line 2"),
        (f"{HEADER}\n ,s2,1,2,3,4,5,6\n", "line 2: empty uuid"),
        (f"{HEADER}\n{ROW}\n".encode() + b"u\xff,s,1,2,3,4,5,6\n", "line 3: not UTF-8"),
        (f'{HEADER}\n"u1,s1,1,2,3,4,5,6\n', "line 2: not a valid csv"),
    ],
)
def test_malformed_csv(tmp_path, text, fragment):
    path = write_csv(tmp_path, text)
    with pytest.raises(errors.MalformedCsvError) as info:
        stacks.read_circumferences(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and fragment in message


def test_csv_missing_and_empty(tmp_path):
    with pytest.raises(errors.MissingObjectError, match="fetal_abdominal_circumferences_per_sweep.csv"):
        stacks.read_circumferences(str(tmp_path))
    write_csv(tmp_path, "")
    with pytest.raises(errors.EmptyFileError, match="fetal_abdominal_circumferences_per_sweep.csv"):
        stacks.read_circumferences(str(tmp_path))


@pytest.mark.parametrize("max_gib, declared_gib", [(None, 1.5), (0.5, 1.5), (1.5, 1.5), (4.0, 4.0)])
def test_read_tasks_declare_the_memory_of_the_largest_case_they_may_decode(max_gib, declared_gib):
    from fetaliqa.inputs.listing import LISTING_SCHEMA  # noqa: PLC0415 - the scoring reader, used here only
    from fetaliqa.score.read import CaseReader  # noqa: PLC0415

    max_bytes = None if max_gib is None else int(max_gib * 2**30)
    reader = CaseReader(LISTING_SCHEMA.empty_table(), max_case_bytes=max_bytes)
    assert reader.task_memory() == int(declared_gib * 2**30)
