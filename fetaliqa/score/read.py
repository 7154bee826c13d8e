"""Scoring's input: list an archive once, streaming, and read its cases as a Ray Data Read.

Cases come from `fetaliqa.inputs.listing.list_archive`, the lister every command shares: a table of
(`case_id`, `source`, `instances`, `error`, `message`) sorted by case id, in which a file the listing already
found bad (not DICOM, bad header or UID, too large) is a row with `error` set, so that it gets its `errors/` row
without being read. A URI in a manifest that is missing or unreadable gets its `errors/` row when read.

Sizes are checked before allocating, against `max_case_bytes` (`--max-case-gib`; default `READ_TASK_MEMORY`,
what a read task declares, and a larger limit makes a task declare as much: `CaseReader.task_memory`): a
stacked case whose decoded size (from its header) is over it is a `too_large` row. A DICOM study is decoded one instance at a time, each instance's frames released once resized, so the
limit applies to each instance: one over it (found at listing from its header, checked again at reading) is
its own `too_large` row, and its study goes on with its other sweeps.

`CaseReader` is the Read: each read task decodes its cases one by one and yields one block per case,
`read_case_row`'s row. This module imports no torch: a read worker starts in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from fetaliqa.errors import InputError, StudyFailedError
from fetaliqa.inputs.cases import read_case_frames
from fetaliqa.inputs.dicom import read_dicom_instance
from fetaliqa.inputs.layout import SWEEPS_PER_CASE
from fetaliqa.inputs.listing import MAX_CASE_BYTES, CaseRef
from fetaliqa.inputs.metaimage import DecodeBuffer
from fetaliqa.inputs.storage import StorageOptions
from fetaliqa.preprocess import IMAGE_SIZE, resize_by

# What decoding one ACOUSLIC-size case holds at its peak: the compressed file (~200 MB), the decoded
# stack (351 MB) and the resized frames (42 MB); Ray Data measured 1.1 GiB. Declaring it lets Ray bound
# concurrent reads by RAM.
READ_TASK_MEMORY = MAX_CASE_BYTES  # 1.5 GiB

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

# What `cases/` says of a DICOM study's context, from the header (`InstanceHeader`) of its first instance read.
STUDY_CONTEXT = ("study_date", "institution", "station", "manufacturer", "device_model")

# Fault injection for tests: a comma-separated list of case ids whose read kills its worker (SIGKILL, as the
# kernel's OOM killer does) on every attempt.
KILL_READ_ENV = "FETALIQA_FAULT_KILL_READ_OF"


def read_case_row(case_id: str, source: str, storage_options: StorageOptions = None,
                  image_size: int = IMAGE_SIZE, instances: list[str] | None = None, error: str = "",
                  message: str = "", resize: str = "bicubic", max_case_bytes: int | None = READ_TASK_MEMORY,
                  buffer: DecodeBuffer | None = None) -> dict:
    """Decode one case and preprocess its frames on CPU; record an input error instead of raising.

    A stacked image is read from `source`; a DICOM study from `instances`, its sweeps in order (each
    instance's frames cropped to its imaging region, resized on their own: instances may differ in size).
    A case the listing already found bad (`error` set) is returned as it is, unread. Frames are resized by
    `resize` (a key of `fetaliqa.preprocess.RESIZES`: the checkpoint's). A stacked image, or an instance of a
    study, whose header declares more than `max_case_bytes` decoded (None: no limit) is refused undecoded
    (`too_large`; see the module docstring). `buffer`: memory the caller decodes its cases into one after
    another (a read task's; the native frames never leave this function, only their resized copy).

    Returns {"case_id", "source", "images" (T, S, S) uint8 (S = `image_size`, the checkpoint's),
    "sweeps" (JSON text: a list, one object per sweep in order, {"frames", "height", "width" (native size of
    the frames scored: the cropped region for DICOM), "spacing" ([row, col] mm, or null), "sop_instance_uid" (null for
    stacked images)}), "study" (JSON text: a DICOM study's `STUDY_CONTEXT` from the header of its first instance
    read, each null when absent; "{}" for stacked images), "note" (one line: sweeps without spacing and why,
    frames not cropped; "" when none),
    "instance_errors" (JSON text: [source, kind, message] of each instance of a study that failed),
    "error", "message" ("" when read)}. A case that cannot be read comes back with T = 0 and the error kind
    and one-line message; a study whose instances all fail, with kind `study_failed`.
    Per-sweep facts travel as JSON text so that Ray's blocks keep one fixed-shape column each.
    """
    out = {"case_id": case_id, "source": source, "images": np.zeros((0, image_size, image_size), np.uint8),
           "sweeps": "[]", "study": "{}", "note": "", "instance_errors": "[]", "error": error, "message": message}
    if error:
        return out
    try:
        if instances is None:
            stack = read_case_frames(CaseRef(case_id, source), storage_options, max_case_bytes, buffer)
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
    images, sweeps, notes, failed, study = [], [], [], [], {}
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
        study = study or {name: getattr(instance.header, name) for name in STUDY_CONTEXT}
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
    return {"images": np.concatenate(images), "sweeps": json.dumps(sweeps), "study": json.dumps(study),
            "note": "; ".join(notes), "instance_errors": json.dumps(failed)}


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

    def task_memory(self) -> int:
        """Bytes each read task declares to Ray: `READ_TASK_MEMORY`, or `max_case_bytes` when that is larger
        (`--max-case-gib` above the default), so that Ray places a task that may decode such a case only where
        that much memory is free."""
        return max(READ_TASK_MEMORY, self.max_case_bytes or 0)

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
            buffer = DecodeBuffer()  # the task's cases decode one after another into the same memory
            for case_id, source, uris, error, message in zip(ids, sources, instances, errors, messages):
                _maybe_die_reading(case_id)
                row = read_case_row(case_id, source, options, size, uris, error, message, resize, max_bytes,
                                    buffer)
                yield BlockAccessor.batch_to_block({key: np.asarray([value]) if key != "images" else value[None]
                                                    for key, value in row.items()})

        metadata = BlockMetadata(num_rows=len(ids), size_bytes=None, exec_stats=None, input_files=None)
        return ReadTask(read, metadata)


def _maybe_die_reading(case_id: str) -> None:
    if case_id in os.environ.get(KILL_READ_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
