"""Score every frame of a sweep archive on Ray and write Parquet: `python -m jobs.score --input ... --checkpoint ... --output ...`.

ReadCases (CPU tasks: fsspec -> fetaliqa's MetaImage reader or SimpleITK, or pydicom for DICOM studies -> 224x224 frames) -> ScoreFrames (actors holding the model, GPU
or CPU) -> summarise_cases (CPU: masks to native size, PNGs, AC) -> WriteParts (Parquet parts of many cases,
each committed by a record). Rerunning the same command after any failure finishes the archive: complete
cases are skipped, nothing is scored twice (`fetaliqa.score.ledger`). With --pseudonymize-key-file, identifiers
are written as keyed pseudonyms (`fetaliqa.pseudonym`); `fetaliqa pseudonym` recomputes them for the key holder.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fetaliqa.inputs.listing import list_archive, listing_notes
from fetaliqa.models import load_checkpoint
from fetaliqa.pseudonym import KeyFile, Pseudonyms, key_id, load_key
from fetaliqa.redact import redact_text
from fetaliqa.score import lease, ledger, record
from fetaliqa.score.predict import ScoreFrames
from fetaliqa.score.read import READ_TASK_MEMORY, READ_TASK_RETRIES, CaseReader
from fetaliqa.score.write import WRITE_TASK_CPUS, PartWriter, as_written, summarise_cases
from jobs.common import (absolute_local_paths, add_shared_filesystem, add_storage_options,
                         check_paths_reach_every_node, init_ray, run_recipe)

# A part holds up to 50 cases (42,000 frames of ACOUSLIC): an archive of N cases gets at most
# max(10, N / 50) files per table, and a failure loses at most the parts being written.
MAX_CASES_PER_FILE = 50
# Read tasks whose every attempt died (`READ_TASK_RETRIES`) that a run tolerates, as a share of its read tasks
# (rounded up): their cases get `worker_died` rows and the next run retries them. Beyond it the run stops, as
# for any failure it did not expect: so many deaths mean a fault a rerun would meet again (a node too small for
# its cases, a broken decoder or model), which the morning should see as a failed run, not as a list of errors.
LOST_READ_TASKS_TOLERATED = 0.05
# At most this many cases in one call of a GPU predictor: 8 ACOUSLIC cases are 6,720 frames (26 micro-batches
# of 256, 340 MB of uint8 frames pinned on the host and again on the GPU), two calls at once per actor.
GPU_CASES_PER_CALL = 8


def build_parser(prog: str = "python -m jobs.score") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="ACOUSLIC archive root, folder or prefix of stacked images and/or DICOM files, "
                             "or a manifest of URIs (.txt, .csv, .parquet)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (local path or fsspec URL)")
    parser.add_argument("--output", required=True, help="output folder (local path or fsspec URL)")
    parser.add_argument("--actors", type=int, default=1, help="predictor actors (model replicas)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="frames per forward pass (default: 256 on a GPU, 32 on CPU, chosen by each actor)")
    parser.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per predictor actor (0: CPU)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per predictor actor")
    parser.add_argument("--cases-per-file", type=int, default=None,
                        help=f"cases per Parquet part (default: N/10 for N cases, at most {MAX_CASES_PER_FILE})")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier run's output first and start afresh")
    parser.add_argument("--progress-seconds", type=float, default=30.0, help="seconds between progress lines")
    add_shared_filesystem(parser)
    parser.add_argument("--recursive", action="store_true",
                        help="list stacked images (.mha, .nii.gz, ...) at any depth of an --input folder, not only "
                             "directly in it (DICOM files are found at any depth either way)")
    parser.add_argument("--max-case-gib", type=_positive_gib, default=READ_TASK_MEMORY / 2**30,
                        help="largest decoded size of a case (of a DICOM study: of each instance), computed from its "
                             "header before decoding; a larger one is an errors/ row 'too_large' "
                             "(default: %(default)g, the memory a read task declares; a larger value makes read tasks "
                             "declare as much)")
    parser.add_argument("--pseudonymize-key-file", default=None, metavar="PATH",
                        help="write every identifier (case_id, source, SOP Instance UIDs, institution, station) as its "
                             "HMAC-SHA256 pseudonym under the key in this file (local path or fsspec URL; at least "
                             "16 bytes; never written anywhere) and study dates to the month; reruns into the same "
                             "--output need the same key")
    add_storage_options(parser)
    return parser


def _positive_gib(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of GiB")
    return value


def score(args: argparse.Namespace) -> int:
    so, started = args.storage_options, time.perf_counter()
    absolute_local_paths(args, ("input", "checkpoint", "output", "pseudonymize_key_file"))
    _, meta = load_checkpoint(args.checkpoint, storage_options=so)  # a bad checkpoint fails before any work
    key_file, pseudonyms = _pseudonyms(args.pseudonymize_key_file, so)  # a bad key too
    init_ray()  # before the output changes: a cluster that cannot reach its paths leaves it as it was
    check_paths_reach_every_node({"input": args.input, "checkpoint": args.checkpoint, "output": args.output,
                                  "pseudonymize-key-file": args.pseudonymize_key_file}, args.shared_filesystem)
    run = record.begin(args.input, args.output, args.checkpoint, meta, args.overwrite, so,
                       key_id=key_file and key_file.key_id)
    run["input"] = pseudonyms.id(run["input"])  # a folder's name may name a site or a patient, a file is a source
    max_case_bytes = int(args.max_case_gib * 2**30)
    # Listed before the output changes: a bad --input leaves it as it was.
    listed = list_archive(args.input, so, args.recursive, max_case_bytes)
    # e.g. single-frame DICOM instances, DICOMDIRs skipped: in the log and run.json, their URLs redacted (and
    # pseudonymised with the UIDs, with a key)
    run["notes"] = [pseudonyms.text(redact_text(note)) for note in listing_notes(listed)]
    for note in run["notes"]:
        print(f"note: {note}", flush=True)
    held = lease.Lease(args.output, run["run_id"], so)
    took_over = held.take()  # before the output changes: a live run's output is refused, untouched
    if took_over:
        run["notes"].append(took_over)
        print(f"note: {took_over}", flush=True)
    with held.hold():
        if args.overwrite:
            ledger.reset(args.output, so)
        resumed = ledger.resume(args.output, so)
        # Commit records hold case ids as written: pseudonyms, with a key (a scored case's id is its own redacted)
        listed_ids = (as_written(listed, pseudonyms, ("case_id",))["case_id"] if pseudonyms.enabled
                      else listed["case_id"])
        todo = listed.filter(pc.invert(pc.is_in(listed_ids, pa.array(sorted(resumed.scored), pa.string()))))
        cases_per_file = args.cases_per_file or min(max(math.ceil(todo.num_rows / 10), 1), MAX_CASES_PER_FILE)
        record.write_record(args.output, run, so)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = sys.stderr.isatty()  # job logs get `ProgressLog` lines

        image_size, stages = meta["preprocess"]["image_size"], ""
        progress = record.Progress.remote()
        writer = PartWriter(args.output, run["run_id"], meta["checkpoint_id"], cases_per_file, so, progress)
        if todo.num_rows:
            reader = CaseReader(todo, so, image_size, resize=meta["preprocess"]["interpolation"],
                                max_case_bytes=max_case_bytes)
            context.max_errored_blocks = math.ceil(LOST_READ_TASKS_TOLERATED * reader.read_task_count())
            ds = ray.data.read_datasource(reader, override_num_blocks=reader.read_task_count(), memory=reader.task_memory(),
                                          concurrency=reader.read_concurrency(),
                                          ray_remote_args={"max_retries": READ_TASK_RETRIES})
            cases_per_call = predictor_cases_per_call(args.num_gpus_per_actor, todo.num_rows, reader.read_task_count())
            ds = ds.map_batches(ScoreFrames, fn_constructor_kwargs={"checkpoint": args.checkpoint,
                                                                    "batch_size": args.batch_size,
                                                                    "storage_options": so},
                                batch_size=cases_per_call, compute=predictor_pool(args.actors, args.num_gpus_per_actor),
                                num_gpus=args.num_gpus_per_actor, num_cpus=args.cpus_per_actor, batch_format="numpy")
            ds = ds.map_batches(summarise_cases, fn_kwargs={"threshold": meta["threshold"], "image_size": image_size,
                                                            "key_file": key_file},
                                batch_size=1, batch_format="numpy", num_cpus=WRITE_TASK_CPUS)
            with record.ProgressLog(progress, todo.num_rows, args.progress_seconds):
                ds.write_datasink(writer, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
            stages = ds.stats()
            print(stages, flush=True)
            # Only when the parts' tallies miss cases does the ledger say which: the records are the truth.
            written = sum(t["cases"] + t["failed"] for t in writer.tallies)
            lost = (ledger.record_lost_cases(args.output, run["run_id"], as_written(todo, pseudonyms), so)
                    if written < todo.num_rows else 0)
            if lost:
                print(f"warning: {lost} case(s) lost with workers that died on every attempt: errors/ rows "
                      "'worker_died'; rerun the same command to retry them", file=sys.stderr, flush=True)
                writer.tallies.append({"part": f"{run['run_id']}-lost", "cases": 0, "failed": lost, "frames": 0,
                                       "positives": 0})
        ray.kill(progress)  # a driver that runs several jobs (tests, benchmarks) keeps no idle actor of each

        run = record.finish(run, listed.num_rows, resumed, writer.tallies, cases_per_file, stages,
                            time.perf_counter() - started)
        held.refresh()  # `LeaseLostError` if another run took the output over meanwhile: not marked complete
        record.write_record(args.output, run, so)
    print(record.summary_line(run), flush=True)
    return 0


def _pseudonyms(key_url: str | None, storage_options) -> tuple[KeyFile | None, Pseudonyms]:
    """The run's key file (where the key is and its id: what Ray's write tasks get, never the key) and the driver's
    pseudonyms; (None, no pseudonyms) without `--pseudonymize-key-file`."""
    if key_url is None:
        return None, Pseudonyms()
    key = load_key(key_url, storage_options)
    return KeyFile(key_url, key_id(key), storage_options), Pseudonyms(key)


def predictor_pool(actors: int, gpus_per_actor: float) -> ray.data.ActorPoolStrategy:
    """`actors` predictor actors. A GPU actor runs two calls at once, each on its own CUDA stream
    (`FrameModel`): one case's copies and Ray's host work overlap the other's compute, so the GPU is fed.
    It scores on the GPU Ray assigned it, or on the CPU where torch sees no CUDA
    (`fetaliqa.models.frame_model.scoring_device`); a CPU actor always on the CPU, even on a GPU node.
    A CPU actor runs one call at a time: two would share its cores."""
    if gpus_per_actor > 0:
        return ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2,
                                          enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(size=actors)


def predictor_cases_per_call(gpus_per_actor: float, cases: int, read_tasks: int) -> int | None:
    """Cases a predictor call scores (Ray Data's `batch_size` in rows). CPU actors: None, a block per call (a
    read task's cases, in blocks of up to 128 MB). Ray Data refuses None where GPUs are requested, so GPU
    actors get a read task's cases (the same calls as on CPU when each task's cases fit one block), at most
    `GPU_CASES_PER_CALL`."""
    if gpus_per_actor <= 0:
        return None
    return max(1, min(math.ceil(cases / max(read_tasks, 1)), GPU_CASES_PER_CALL))


def main(argv: list[str] | None = None, prog: str = "python -m jobs.score") -> int:
    return run_recipe(score, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
