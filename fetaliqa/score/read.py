"""Scoring's input: list an archive once, streaming, and read its cases as a Ray Data Read.

`list_archive(input_url)` streams the case list of any input into a two-column Arrow table (`case_id`,
`source`) sorted by case id: the driver holds that table (a few dozen bytes a case: ~100 MB for a
million cases) and nothing else per case. Inputs:
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
grouped into studies from their headers (`fetaliqa.inputs.dicom_studies`): a study is one case whose
`instances` are its sweeps in order; DICOMDIR files are skipped with a note; a file that is not DICOM, has a
bad header or StudyInstanceUID, or is too large is listed as already failed (`error`, `message` set, `case_id`
its URI, never its name, which repeats across folders), so that it gets its `errors/` row without being read.
A URI in a manifest that is missing or unreadable is not checked here (that would cost a request per
case): reading it gives the case an `errors/` row.

Sizes are checked before allocating, against `max_case_bytes` (`--max-case-gib`; default `READ_TASK_MEMORY`,
what a read task declares): a stacked case whose decoded size (from its header) is over it is a `too_large`
row. A DICOM study is decoded one instance at a time, each instance's frames released once resized, so the
limit applies to each instance: one over it (found at listing from its header, checked again at reading) is
its own `too_large` row, and its study goes on with its other sweeps.

`CaseReader` is the Read: each read task decodes its cases one by one and yields one block per case,
`read_case_row`'s row. This module imports no torch: a read worker starts in well under a second.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import signal
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from fetaliqa.errors import InputError, MissingObjectError, StudyFailedError
from fetaliqa.inputs import layout
from fetaliqa.inputs import storage
from fetaliqa.inputs.dicom import is_dicom_candidate, read_dicom_instance
from fetaliqa.inputs.dicom_studies import list_dicom_studies
from fetaliqa.inputs.layout import SWEEPS_PER_CASE
from fetaliqa.inputs.stacks import read_image_stack
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.preprocess import IMAGE_SIZE, resize_by

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
URI_COLUMN = "uri"
LISTING_SCHEMA = pa.schema([
    ("case_id", pa.string()), ("source", pa.string()),
    ("instances", pa.list_(pa.string())),  # a DICOM study's sweep URIs in order; null for stacked images
    ("error", pa.string()), ("message", pa.string()),  # set when the listing already found the file bad
])
NOTES_KEY = b"fetaliqa.notes"  # the listing's notes (JSON list of lines) in its schema metadata
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
# Attempts of a read task after the first when its worker dies. Ray Data's default retries for ever, so a case
# that kills its worker every time (a decoder that crashes on it, memory it needs and the node lacks) would hold
# the run until morning; after these its task's cases are lost and `jobs.score` records them (`worker_died`).
READ_TASK_RETRIES = 3

# Fault injection for tests: a comma-separated list of case ids whose read kills its worker (SIGKILL, as the
# kernel's OOM killer does) on every attempt.
KILL_READ_ENV = "FETALIQA_FAULT_KILL_READ_OF"


def list_archive(input_url: str, storage_options: StorageOptions = None, recursive: bool = False,
                 max_case_bytes: int | None = READ_TASK_MEMORY) -> pa.Table:
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
                  image_size: int = IMAGE_SIZE, instances: list[str] | None = None, error: str = "",
                  message: str = "", resize: str = "bicubic", max_case_bytes: int | None = READ_TASK_MEMORY) -> dict:
    """Decode one case and preprocess its frames on CPU; record an input error instead of raising.

    A stacked image is read from `source`; a DICOM study from `instances`, its sweeps in order (each
    instance's frames cropped to its imaging region, resized on their own: instances may differ in size).
    A case the listing already found bad (`error` set) is returned as it is, unread. Frames are resized by
    `resize` (a key of `fetaliqa.preprocess.RESIZES`: the checkpoint's). A stacked image, or an instance of a
    study, whose header declares more than `max_case_bytes` decoded (None: no limit) is refused undecoded
    (`too_large`; see the module docstring).

    Returns {"case_id", "source", "images" (T, S, S) uint8 (S = `image_size`, the checkpoint's),
    "sweeps" (JSON text: a list, one object per sweep in order, {"frames", "height", "width" (native size of
    the frames scored: the cropped region for DICOM), "spacing" ([row, col] mm, or null), "sop_instance_uid" (null for
    stacked images)}), "note" (one line: sweeps without spacing and why, frames not cropped; "" when none),
    "instance_errors" (JSON text: [source, kind, message] of each instance of a study that failed),
    "error", "message" ("" when read)}. A case that cannot be read comes back with T = 0 and the error kind
    and one-line message; a study whose instances all fail, with kind `study_failed`.
    Per-sweep facts travel as JSON text so that Ray's blocks keep one fixed-shape column each.
    """
    out = {"case_id": case_id, "source": source, "images": np.zeros((0, image_size, image_size), np.uint8),
           "sweeps": "[]", "note": "", "instance_errors": "[]", "error": error, "message": message}
    if error:
        return out
    try:
        if instances is None:
            stack = read_image_stack(source, storage_options, max_case_bytes)
            n, height, width = stack.frames.shape
            sweep = {"frames": n // SWEEPS_PER_CASE, "height": height, "width": width,
                     "spacing": list(stack.spacing_mm), "sop_instance_uid": None}
            return out | {"images": resize_by(resize)(stack.frames, image_size),
                          "sweeps": json.dumps([sweep] * SWEEPS_PER_CASE)}
        return out | _read_study(case_id, source, instances, storage_options, image_size, resize, max_case_bytes)
    except InputError as err:
        return out | {"error": err.kind, "message": str(err)}
    except Exception as err:  # noqa: BLE001 - one unreadable case must not stop an archive
        return out | {"error": "unreadable", "message": _unreadable(source, err)}


def _read_study(case_id: str, source: str, instances: list[str], storage_options: StorageOptions,
                image_size: int, resize: str, max_instance_bytes: int | None) -> dict:
    """`read_case_row`'s fields of a DICOM study, from its instance URIs in sweep order."""
    images, sweeps, notes, failed = [], [], [], []
    for uri in instances:
        try:
            instance = read_dicom_instance(uri, storage_options, max_instance_bytes)
        except InputError as err:
            failed.append([uri, err.kind, str(err)])
            continue
        except Exception as err:  # noqa: BLE001 - one unreadable instance must not stop its study
            failed.append([uri, "unreadable", _unreadable(uri, err)])
            continue
        images.append(resize_by(resize)(instance.frames, image_size))
        n, height, width = instance.frames.shape
        sweeps.append({"frames": n, "height": height, "width": width,
                       "spacing": None if instance.spacing_mm is None else list(instance.spacing_mm),
                       "sop_instance_uid": instance.header.sop_uid})
        if instance.spacing_mm is None:
            notes.append(f"sweep {len(sweeps)}: {instance.spacing_note}")
        notes += [f"sweep {len(sweeps)}: {note}" for note in instance.notes]
    if not sweeps:
        err = StudyFailedError(source, f"study {case_id}: all {len(instances)} instance(s) failed "
                                       "(each has its own errors/ row)")
        return {"error": err.kind, "message": str(err), "instance_errors": json.dumps(failed)}
    return {"images": np.concatenate(images), "sweeps": json.dumps(sweeps), "note": "; ".join(notes),
            "instance_errors": json.dumps(failed)}


def _unreadable(source: str, err: Exception) -> str:
    return " ".join(f"{source}: unreadable ({type(err).__name__}: {err})".split())


class CaseReader(Datasource):
    """A Read over listed cases: each read task decodes up to `MAX_CASES_PER_READ_TASK` of them and yields
    one block per case (`read_case_row`'s columns, `images` as a (1, T, S, S) tensor), its frames resized to
    `image_size` by `resize` as the checkpoint's model was trained (`PreprocessSpec`), cases over
    `max_case_bytes` refused undecoded (`read_case_row`)."""

    def __init__(self, cases: pa.Table, storage_options: StorageOptions = None, image_size: int = IMAGE_SIZE,
                 resize: str = "bicubic", max_case_bytes: int | None = READ_TASK_MEMORY):
        resize_by(resize)  # an unknown name fails here, on the driver, not in every read task
        self.cases = cases
        self.storage_options = storage_options
        self.image_size = image_size
        self.resize = resize
        self.max_case_bytes = max_case_bytes

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

    def read_concurrency(self) -> int | None:
        """How many read tasks may run at once: one more than this machine's cores (and no more than
        `read_task_count`: Ray warns of a limit it cannot reach) when a one-node Ray has more logical CPUs than
        cores (a local Ray gets at least 8, `jobs.common.init_ray`); else None, Ray Data's own limits (on a
        cluster, logical CPUs are cores). Decoding is CPU work: on 2 cores, ~5 decodes at once gave 409-432
        frames/s in steady state, 3 gave 482-496 (benchmarks/RESULTS.md); the read beyond the cores lets one
        case's download overlap the others' decoding."""
        import ray

        if not ray.is_initialized() or sum(node["Alive"] for node in ray.nodes()) != 1:
            return None
        cores = os.cpu_count() or 1
        return min(cores + 1, self.read_task_count()) if ray.cluster_resources().get("CPU", 0) > cores else None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        n = self.cases.num_rows
        bounds = np.linspace(0, n, min(parallelism, n) + 1).round().astype(int)
        return [self._task(self.cases.slice(a, b - a)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def _task(self, cases: pa.Table) -> ReadTask:
        # Python lists: compact, not the whole slice's buffers
        ids, sources = cases["case_id"].to_pylist(), cases["source"].to_pylist()
        instances, errors, messages = (cases[c].to_pylist() for c in ("instances", "error", "message"))
        options, size, resize, max_bytes = self.storage_options, self.image_size, self.resize, self.max_case_bytes

        def read() -> Iterator:
            for case_id, source, uris, error, message in zip(ids, sources, instances, errors, messages):
                _maybe_die_reading(case_id)
                row = read_case_row(case_id, source, options, size, uris, error, message, resize, max_bytes)
                yield BlockAccessor.batch_to_block({key: np.asarray([value]) if key != "images" else value[None]
                                                    for key, value in row.items()})

        metadata = BlockMetadata(num_rows=len(ids), size_bytes=None, exec_stats=None, input_files=None)
        return ReadTask(read, metadata)


def _maybe_die_reading(case_id: str) -> None:
    if case_id in os.environ.get(KILL_READ_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
