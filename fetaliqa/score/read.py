"""Scoring's input: list an archive once, streaming, and read its cases as a Ray Data Read.

`list_archive(input_url)` streams the case list of any input into a two-column Arrow table (`case_id`,
`source`) sorted by case id: the driver holds that table (a few dozen bytes a case: ~100 MB for a
million cases) and nothing else per case. Inputs:
- the root of an ACOUSLIC layout (it holds `images/stacked_fetal_ultrasound/`): its images;
- a folder or object-store prefix of stacked images (`layout.IMAGE_SUFFIXES`; hidden files and other
  names are skipped; not recursive): S3 prefixes are listed page by page, 1,000 keys a request;
- a manifest, one image URI a row (relative URIs are taken relative to the manifest's folder):
  `.txt` (one a line; blank lines and `#` comments skipped), `.csv` (a header; the `uri` column, else
  the first), `.parquet` (the `uri` column, else the first);
- one image file.
A URI in a manifest that is missing or unreadable is not checked here (that would cost a request per
case): reading it gives the case an `errors/` row.

`CaseReader` is the Read: each read task decodes its cases one by one and yields one block per case,
`read_case_row`'s row. This module imports no torch: a read worker starts in well under a second.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from fetaliqa import layout, storage
from fetaliqa.archive import read_image_stack
from fetaliqa.errors import InputError, MissingObjectError
from fetaliqa.preprocess import IMAGE_SIZE, resize_frames
from fetaliqa.storage import StorageOptions

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
URI_COLUMN = "uri"
LISTING_SCHEMA = pa.schema([("case_id", pa.string()), ("source", pa.string())])
_BATCH = 65_536

# What decoding one ACOUSLIC-size case holds at its peak: the compressed file (~200 MB), the decoded
# stack (351 MB) and the resized frames (42 MB); Ray Data measured 1.1 GiB. Declaring it lets Ray bound
# concurrent reads by RAM.
READ_TASK_MEMORY = 3 << 29  # 1.5 GiB

# A read task decodes its cases one after another and yields a block per case, which Ray merges into
# blocks of up to 128 MB: at most this many cases a task, so that small cases do not each pay a task's and a
# block's overhead (1,000 tiny cases on 2 cores: ~21 ms a case in steady state with Ray's default of a
# task per 5 cases, ~7-9 ms with 32 a task), while a lost task costs
# little and large cases still spread over every CPU (at least `TASKS_PER_CPU` tasks per cluster CPU).
MAX_CASES_PER_READ_TASK = 32
TASKS_PER_CPU = 4


def list_archive(input_url: str, storage_options: StorageOptions = None) -> pa.Table:
    """The cases of `input_url` as a (`case_id`, `source`) table sorted by case id; see the module docstring.

    Raises `MissingObjectError` when nothing is found, `InputError` for duplicate case ids or an unreadable
    manifest.
    """
    batches, sources = [], []
    for source in _iter_sources(input_url, storage_options):
        sources.append(source)
        if len(sources) == _BATCH:
            batches.append(_listing_batch(sources))
            sources = []
    if sources:
        batches.append(_listing_batch(sources))
    if not batches:
        raise MissingObjectError(input_url, f"no images found (looked for {', '.join(layout.IMAGE_SUFFIXES)} files)")
    table = pa.Table.from_batches(batches, LISTING_SCHEMA).sort_by("case_id")
    _check_unique(input_url, table)
    return table


def _listing_batch(sources: list[str]) -> pa.RecordBatch:
    return pa.record_batch([pa.array([layout.case_id_of(s) for s in sources], pa.string()),
                            pa.array(sources, pa.string())], schema=LISTING_SCHEMA)


def _check_unique(input_url: str, table: pa.Table) -> None:
    ids = table["case_id"].combine_chunks()
    if len(ids) < 2:
        return
    repeats = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    if pc.any(repeats).as_py():
        at = pc.index(repeats, True).as_py()
        first, second = table["source"][at].as_py(), table["source"][at + 1].as_py()
        raise InputError(input_url, f"duplicate case id {ids[at].as_py()!r}: {first} and {second}")


def _iter_sources(input_url: str, storage_options: StorageOptions) -> Iterator[str]:
    fs, path = storage.filesystem(input_url, storage_options)
    lower = input_url.lower()
    try:
        if lower.endswith(MANIFEST_SUFFIXES):
            yield from _iter_manifest(fs, path, input_url)
        elif layout.image_suffix(input_url):
            if not fs.exists(path):
                raise MissingObjectError(input_url, "no such image")
            yield input_url
        else:
            images = storage.join(input_url, layout.IMAGES_DIR)
            found = False
            for source in _iter_folder(fs, storage.join(path, layout.IMAGES_DIR), images):
                found = True
                yield source
            if not found:
                yield from _iter_folder(fs, path, input_url)
    except InputError:
        raise
    except UnicodeDecodeError as err:
        raise InputError(input_url, "manifest is not UTF-8 text") from err
    except Exception as err:  # noqa: BLE001 - every filesystem raises its own types
        raise storage.describe_io_error(input_url, err) from err


def _iter_folder(fs, path: str, url: str) -> Iterator[str]:
    """Image URIs directly inside folder `path` (`url` as the user wrote it), in listing order."""
    for name in _iter_names(fs, path):
        if layout.image_suffix(name) and not name.startswith("."):
            yield storage.join(url, name)


def _iter_names(fs, path: str) -> Iterator[str]:
    """Names of the files directly in `path`; S3 page by page, other filesystems by one `ls`."""
    if type(fs).__name__ == "S3FileSystem":
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)
        entries = fs._iterdir(bucket, prefix=f"{key.rstrip('/')}/" if key else "", delimiter="/")
        while True:
            try:
                entry = sync(fs.loop, entries.__anext__)
            except StopAsyncIteration:
                return
            if entry["type"] == "file":
                yield posixpath.basename(entry["name"])
        return
    try:
        names = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        yield posixpath.basename(name.rstrip("/"))


def _iter_manifest(fs, path: str, url: str) -> Iterator[str]:
    base = url[: url.rfind("/") + 1]  # the manifest's folder, with its scheme and trailing '/'
    for entry in _iter_manifest_entries(fs, path, url):
        entry = entry.strip()
        if entry:
            yield entry if "://" in entry or entry.startswith("/") else base + entry


def _iter_manifest_entries(fs, path: str, url: str) -> Iterator[str]:
    if url.lower().endswith(".parquet"):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            column = URI_COLUMN if URI_COLUMN in names else names[0]
            for batch in parquet.iter_batches(batch_size=_BATCH, columns=[column]):
                yield from (v for v in batch.column(0).to_pylist() if v is not None)
        return
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        if url.lower().endswith(".csv"):
            rows = csv.reader(text)
            header = next(rows, [])
            at = header.index(URI_COLUMN) if URI_COLUMN in header else 0
            yield from (row[at] for row in rows if len(row) > at)
        else:
            yield from (line for line in text if not line.lstrip().startswith("#"))


def read_case_row(case_id: str, source: str, storage_options: StorageOptions = None,
                  image_size: int = IMAGE_SIZE) -> dict:
    """Decode one case and preprocess its frames on CPU; record an input error instead of raising.

    Returns {"case_id", "source", "images" (T, S, S) uint8 (S = `image_size`, the checkpoint's),
    "height", "width", "spacing_row", "spacing_col" (mm), "error", "message" ("" when read)}.
    A case that cannot be read comes back with T = 0 and the error kind and one-line message.
    """
    out = {"case_id": case_id, "source": source, "images": np.zeros((0, image_size, image_size), np.uint8),
           "height": 0, "width": 0, "spacing_row": 0.0, "spacing_col": 0.0, "error": "", "message": ""}
    try:
        stack = read_image_stack(source, storage_options)
    except InputError as err:
        return out | {"error": err.kind, "message": str(err)}
    except Exception as err:  # noqa: BLE001 - one unreadable case must not stop an archive
        message = " ".join(f"{source}: unreadable ({type(err).__name__}: {err})".split())
        return out | {"error": "unreadable", "message": message}
    _, height, width = stack.frames.shape
    return out | {"images": resize_frames(stack.frames, image_size), "height": height, "width": width,
                  "spacing_row": stack.spacing_mm[0], "spacing_col": stack.spacing_mm[1]}


class CaseReader(Datasource):
    """A Read over listed cases: each read task decodes up to `MAX_CASES_PER_READ_TASK` of them and yields
    one block per case (`read_case_row`'s columns, `images` as a (1, T, S, S) tensor)."""

    def __init__(self, cases: pa.Table, storage_options: StorageOptions = None, image_size: int = IMAGE_SIZE):
        self.cases = cases
        self.storage_options = storage_options
        self.image_size = image_size

    def get_name(self) -> str:
        return "Cases"  # Ray names the operator "ReadCases"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def read_task_count(self) -> int:
        """Tasks of up to `MAX_CASES_PER_READ_TASK` consecutive cases, and at least `TASKS_PER_CPU` per cluster
        CPU. Pass it as `override_num_blocks`: Ray's default (200 and more) would give small cases a task
        each, or split each task's output into that many blocks."""
        import ray

        n = self.cases.num_rows
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        return min(n, max(math.ceil(n / MAX_CASES_PER_READ_TASK), TASKS_PER_CPU * cpus))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        n = self.cases.num_rows
        bounds = np.linspace(0, n, min(parallelism, n) + 1).round().astype(int)
        return [self._task(self.cases.slice(a, b - a)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def _task(self, cases: pa.Table) -> ReadTask:
        ids, sources = cases["case_id"].to_pylist(), cases["source"].to_pylist()  # compact, not the whole slice's buffers
        options, size = self.storage_options, self.image_size

        def read() -> Iterator:
            for case_id, source in zip(ids, sources):
                row = read_case_row(case_id, source, options, size)
                yield BlockAccessor.batch_to_block({key: np.asarray([value]) if key != "images" else value[None]
                                                    for key, value in row.items()})

        metadata = BlockMetadata(num_rows=len(ids), size_bytes=None, exec_stats=None, input_files=None)
        return ReadTask(read, metadata)
