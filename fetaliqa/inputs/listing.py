"""The one lister of fetaliqa: every command that takes --data, --input or --scores' archive finds its cases here.

`list_archive(input_url)` streams the case list of any input into a `LISTING_SCHEMA` Arrow table (`case_id`,
`source`, `instances`, `error`, `message`) sorted by case id: a driver holds that table (a few dozen bytes a
case: ~100 MB for a million cases) and nothing else per case. `score` reads it as it is (failed files become
`errors/` rows); `list_cases` turns it into `CaseRef`s with their masks, for train, evaluate and export.
Inputs:
- the root of an ACOUSLIC layout (it holds `images/stacked_fetal_ultrasound/`): the files there, by the
  folder rule below;
- a folder or object-store prefix, by the folder rule: DICOM files at any depth (a PACS export nests
  patient / study / series folders and repeats file names such as IM000001 in each), stacked images
  (`layout.IMAGE_SUFFIXES`) directly in it only, or at any depth too with `recursive` (`--recursive`); hidden
  files and folders (names starting with '.') and other names are skipped; symbolic links to files count,
  links to folders are not followed. An S3 prefix is one listing without delimiter, page by page (1,000 keys
  a request, cheaper than a request per folder); other filesystems are walked folder by folder;
- a manifest, one image URI a row (relative URIs are taken relative to the manifest's folder):
  `.txt` (one a line; blank lines and `#` comments skipped), `.csv` (a header; the `uri` column, else
  the first), `.parquet` (the `uri` column, else the first);
- one image file, or one DICOM file.
DICOM files (`fetaliqa.inputs.dicom.is_dicom_candidate` names in a folder, any non-image entry of a manifest) are
grouped into studies from their headers (`fetaliqa.inputs.dicom_studies`): a study is one case, keyed by its
StudyInstanceUID, whose `instances` are its sweeps in order; DICOMDIR files are skipped with a note; a file that
is not DICOM, has a bad header or StudyInstanceUID, or is too large is listed as already failed (`error`,
`message` set, `case_id` its URI, never its name, which repeats across folders). A URI in a manifest that is
missing or unreadable is not checked here (that would cost a request per case): reading it reports it.

Annotations sit beside the cases in the ACOUSLIC layout under the archive's root (`archive_root`: the input
folder, a manifest's folder, or the root above an `images/stacked_fetal_ultrasound/` folder):
```
<root>/masks/stacked_fetal_abdomen/<case_id>.mha   a stacked image's id, or a DICOM study's StudyInstanceUID
<root>/circumferences/fetal_abdominal_circumferences_per_sweep.csv
```
which is what `fetaliqa synth` writes for both formats. Nothing here decodes pixels.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fetaliqa.errors import InputError, MissingObjectError
from fetaliqa.inputs import layout
from fetaliqa.inputs import storage
from fetaliqa.inputs.dicom import is_dicom_candidate
from fetaliqa.inputs.dicom_studies import list_dicom_studies
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.redact import public_url

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
URI_COLUMN = "uri"
LISTING_SCHEMA = pa.schema([
    ("case_id", pa.string()), ("source", pa.string()),
    ("instances", pa.list_(pa.string())),  # a DICOM study's sweep URIs in order; null for stacked images
    ("error", pa.string()), ("message", pa.string()),  # set when the listing already found the file bad
])
NOTES_KEY = b"fetaliqa.notes"  # the listing's notes (JSON list of lines) in its schema metadata
_BATCH = 65_536
# The default limit on a DICOM instance's decoded size at listing: what a scoring read task declares
# (`fetaliqa.score.read.READ_TASK_MEMORY`), so that an instance no read task could hold is refused unread.
MAX_CASE_BYTES = 3 << 29  # 1.5 GiB


@dataclass(frozen=True)
class CaseRef:
    """One case and where to read it: `source` is a stacked image's URI, or a DICOM study's first sweep, whose
    `instances` are then all its sweeps' URIs in order (None for a stacked image); `mask_uri` is the case's
    mask in the ACOUSLIC layout, None where the archive has none."""

    case_id: str
    source: str
    instances: tuple[str, ...] | None = None
    mask_uri: str | None = None


def list_cases(input_url: str, storage_options: StorageOptions = None, recursive: bool = False) -> list[CaseRef]:
    """The cases of `input_url` (any input of `list_archive`) with their masks, sorted by case id.

    A case's mask is `<archive_root>/masks/stacked_fetal_abdomen/<case_id><any image suffix>` (one listing of
    that folder, no request per case). Raises what `list_archive` raises, and `InputError` naming the input and
    the first bad file when the listing found files it cannot use (train, evaluate and export need every case;
    only `score` records such files and goes on).
    """
    table = list_archive(input_url, storage_options, recursive, max_case_bytes=None)
    failed = table.filter(pc.not_equal(table["error"], ""))
    if failed.num_rows:
        raise InputError(input_url, f"{failed.num_rows} listed file(s) unusable, the first: "
                                    f"{failed['message'][0].as_py()}")
    masks = _masks_by_case(archive_root(input_url), storage_options)
    return [CaseRef(row["case_id"], row["source"], None if row["instances"] is None else tuple(row["instances"]),
                    masks.get(row["case_id"]))
            for row in table.select(["case_id", "source", "instances"]).to_pylist()]


def archive_root(input_url: str) -> str:
    """The folder whose `masks/` and `circumferences/` annotate the cases of `input_url`: a manifest's or an image
    file's folder, the root above an `images/stacked_fetal_ultrasound` folder, else `input_url` itself."""
    url = input_url.rstrip("/")
    if is_manifest(url) or layout.image_suffix(url):
        url = public_url(url)  # a presigned file's folder: no signature (its other objects are not signed by it)
        url = url[: url.rfind("/")] if "/" in url else "."
    return url[: -len(layout.IMAGES_DIR) - 1] if url.endswith("/" + layout.IMAGES_DIR) else url


def is_manifest(url: str) -> bool:
    """Whether `url` names a manifest, by the suffix of its path (a presigned URL's query string aside)."""
    return layout.url_path(url).lower().endswith(MANIFEST_SUFFIXES)


def _masks_by_case(root_url: str, storage_options: StorageOptions) -> dict[str, str]:
    """{case id: mask URI} of the masks folder under `root_url` (empty when there is none)."""
    masks_url = storage.join(root_url, layout.MASKS_DIR)
    fs, path = storage.filesystem(masks_url, storage_options)
    try:
        if not fs.isdir(path):
            return {}
        entries = fs.ls(path, detail=True)
    except Exception as err:  # noqa: BLE001 - every filesystem raises its own types
        raise storage.describe_io_error(masks_url, err) from err
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if storage.is_file_entry(fs, e))
    masks: dict[str, str] = {}
    for name in names:
        if layout.image_suffix(name) and not name.startswith("."):
            case_id = layout.case_id_of(name)
            if case_id in masks:
                raise InputError(masks_url, f"two masks for case {case_id!r}: {posixpath.basename(masks[case_id])} "
                                            f"and {name}")
            masks[case_id] = storage.join(masks_url, name)
    return masks


def list_archive(input_url: str, storage_options: StorageOptions = None, recursive: bool = False,
                 max_case_bytes: int | None = MAX_CASE_BYTES) -> pa.Table:
    """The cases of `input_url` as a `LISTING_SCHEMA` table sorted by case id; see the module docstring.

    `recursive`: stacked images at any depth of a folder, not only directly in it. `max_case_bytes`: DICOM
    instances declaring more are listed as `too_large` (None: no limit). The listing's notes (DICOMDIRs and
    single-frame DICOM instances skipped), one line each, are a JSON list under `NOTES_KEY` in the table's schema
    metadata (`listing_notes`). Raises `MissingObjectError` when nothing is found, `InputError` for duplicate
    case ids or an unreadable manifest.
    """
    batches, sources, dicom_candidates = [], [], []
    for source in _iter_sources(input_url, storage_options, recursive):
        if not layout.image_suffix(source):
            dicom_candidates.append(source)
            continue
        sources.append(source)
        if len(sources) == _BATCH:
            batches.append(_listing_batch(sources))
            sources = []
    if sources:
        batches.append(_listing_batch(sources))
    notes: list[str] = []
    if dicom_candidates:
        rows, notes = list_dicom_studies(dicom_candidates, storage_options, max_case_bytes)
        batches.append(pa.RecordBatch.from_pylist(
            [{"case_id": r.case_id, "source": r.source, "instances": None if r.instances is None else list(r.instances),
              "error": r.error, "message": r.message} for r in rows], schema=LISTING_SCHEMA))
    if not any(b.num_rows for b in batches):
        raise MissingObjectError(input_url, f"no images found (looked for {', '.join(layout.IMAGE_SUFFIXES)} "
                                            "files and DICOM files)")
    table = pa.Table.from_batches(batches, LISTING_SCHEMA).sort_by("case_id")
    _check_unique(input_url, table)
    return table.replace_schema_metadata({NOTES_KEY: json.dumps(notes)})


def listing_notes(table: pa.Table) -> list[str]:
    """The notes `list_archive` attached to its table (an empty list when none)."""
    return json.loads((table.schema.metadata or {}).get(NOTES_KEY, b"[]"))


def _listing_batch(sources: list[str]) -> pa.RecordBatch:
    n = len(sources)
    return pa.record_batch([pa.array([layout.case_id_of(s) for s in sources], pa.string()),
                            pa.array(sources, pa.string()), pa.nulls(n, pa.list_(pa.string())),
                            pa.array([""] * n, pa.string()), pa.array([""] * n, pa.string())], schema=LISTING_SCHEMA)


def _check_unique(input_url: str, table: pa.Table) -> None:
    ids = table["case_id"].combine_chunks()
    if len(ids) < 2:
        return
    repeats = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    if pc.any(repeats).as_py():
        at = pc.index(repeats, True).as_py()
        first, second = table["source"][at].as_py(), table["source"][at + 1].as_py()
        raise InputError(input_url, f"duplicate case id {ids[at].as_py()!r}: {first} and {second}")


def _iter_sources(input_url: str, storage_options: StorageOptions, recursive: bool) -> Iterator[str]:
    fs, path = storage.filesystem(input_url, storage_options)
    try:
        if is_manifest(input_url):
            yield from _iter_manifest(fs, path, input_url)
        elif layout.image_suffix(input_url):
            if not fs.exists(path):
                raise MissingObjectError(input_url, "no such image")
            yield input_url
        else:
            images = storage.join(input_url, layout.IMAGES_DIR)
            found = False
            for source in _iter_folder(fs, storage.join(path, layout.IMAGES_DIR), images, recursive):
                found = True
                yield source
            if not found:
                for source in _iter_folder(fs, path, input_url, recursive):
                    found = True
                    yield source
            # Not a folder: one DICOM file (checked last, so that listing a folder costs no extra request).
            if not found and is_dicom_candidate(posixpath.basename(input_url.rstrip("/"))) and fs.isfile(path):
                yield input_url
    except InputError:
        raise
    except UnicodeDecodeError as err:
        raise InputError(input_url, "manifest is not UTF-8 text") from err
    except Exception as err:  # noqa: BLE001 - every filesystem raises its own types
        raise storage.describe_io_error(input_url, err) from err


def _iter_folder(fs, path: str, url: str, recursive: bool) -> Iterator[str]:
    """Image and DICOM-candidate URIs under folder `path` (`url` as the user wrote it) by the folder rule of the
    module docstring, in listing order."""
    for relative in _iter_files(fs, path):
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if layout.image_suffix(parts[-1]):
            if recursive or len(parts) == 1:
                yield storage.join(url, relative)
        elif is_dicom_candidate(parts[-1]):
            yield storage.join(url, relative)


def _iter_files(fs, path: str) -> Iterator[str]:
    """Paths relative to folder `path` of the files at any depth under it (none when it is no folder), streaming:
    S3 in one listing without delimiter, page by page; other filesystems by `walk`, folder by folder, hidden
    folders left unvisited."""
    if type(fs).__name__ == "S3FileSystem":
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)
        prefix = f"{bucket}/{key.rstrip('/')}/" if key else f"{bucket}/"
        entries = fs._iterdir(bucket, prefix=prefix[len(bucket) + 1:], delimiter="")
        while True:
            try:
                entry = sync(fs.loop, entries.__anext__)
            except StopAsyncIteration:
                return
            relative = entry["name"][len(prefix):]
            if entry["type"] == "file" and relative and not relative.endswith("/"):  # not a folder marker
                yield relative
        return
    root = None
    for folder, folders, files in fs.walk(path, detail=True):
        root = folder if root is None else root
        for hidden in [name for name in folders if name.startswith(".")]:
            del folders[hidden]  # `walk` visits the folders left in it
        within = folder[len(root):].strip("/")
        for name, entry in files.items():
            # `walk` of a file lists the file itself, named ""; a symbolic link is a file when it leads to one.
            if name and storage.is_file_entry(fs, entry):
                yield f"{within}/{name}" if within else name


def _iter_manifest(fs, path: str, url: str) -> Iterator[str]:
    unsigned = public_url(url)  # a presigned manifest's query string would otherwise cut its folder short
    base = unsigned[: unsigned.rfind("/") + 1]  # the manifest's folder, with its scheme and trailing '/'
    for entry in _iter_manifest_entries(fs, path, url):
        entry = entry.strip()
        if entry:
            yield entry if "://" in entry or entry.startswith("/") else base + entry


def _iter_manifest_entries(fs, path: str, url: str) -> Iterator[str]:
    manifest_path = layout.url_path(url).lower()  # a presigned URL's query string aside
    if manifest_path.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            column = URI_COLUMN if URI_COLUMN in names else names[0]
            for batch in parquet.iter_batches(batch_size=_BATCH, columns=[column]):
                yield from (v for v in batch.column(0).to_pylist() if v is not None)
        return
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        if manifest_path.endswith(".csv"):
            rows = csv.reader(text)
            header = next(rows, [])
            at = header.index(URI_COLUMN) if URI_COLUMN in header else 0
            yield from (row[at] for row in rows if len(row) > at)
        else:
            yield from (line for line in text if not line.lstrip().startswith("#"))
