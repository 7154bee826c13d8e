"""Score every frame of a sweep archive on Ray and write Parquet: `python -m jobs.score --input ... --checkpoint ... --output ...`.

ReadCases (CPU tasks: fsspec -> SimpleITK, or pydicom for DICOM studies -> 224x224 frames) -> ScoreFrames (actors holding the model, GPU
or CPU) -> summarise_cases (CPU: masks to native size, PNGs, AC) -> WriteParts (Parquet parts of many cases,
each committed by a record). Rerunning the same command after any failure finishes the archive: complete
cases are skipped, nothing is scored twice (`fetaliqa.score.ledger`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from fetaliqa.models import load_checkpoint
from fetaliqa.score import ledger, record
from fetaliqa.score.predict import ScoreFrames
from fetaliqa.score.read import READ_TASK_MEMORY, CaseReader, list_archive, listing_notes
from fetaliqa.score.write import WRITE_TASK_CPUS, PartWriter, summarise_cases
from jobs.common import add_storage_options, init_ray, run_recipe

# A part holds up to 50 cases (42,000 frames of ACOUSLIC): an archive of N cases gets at most
# max(10, N / 50) files per table, and a failure loses at most the parts being written.
MAX_CASES_PER_FILE = 50
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
    add_storage_options(parser)
    return parser


def score(args: argparse.Namespace) -> int:
    so, started = args.storage_options, time.perf_counter()
    _, meta = load_checkpoint(args.checkpoint, storage_options=so)  # a bad checkpoint fails before any work
    run = record.begin(args.input, args.output, args.checkpoint, meta, args.overwrite, so)
    listed = list_archive(args.input, so)  # before the output changes: a bad --input leaves it as it was
    run["notes"] = listing_notes(listed)  # e.g. single-frame DICOM instances skipped: in the log and run.json
    for note in run["notes"]:
        print(f"note: {note}", flush=True)
    if args.overwrite:
        ledger.reset(args.output, so)
    resumed = ledger.resume(args.output, so)
    todo = listed.filter(pc.invert(pc.is_in(listed["case_id"], pa.array(sorted(resumed.scored), pa.string()))))
    cases_per_file = args.cases_per_file or min(max(math.ceil(todo.num_rows / 10), 1), MAX_CASES_PER_FILE)
    record.write_record(args.output, run, so)
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()  # job logs get `ProgressLog` lines

    image_size, stages = meta["preprocess"]["image_size"], ""
    progress = record.Progress.remote()
    writer = PartWriter(args.output, run["run_id"], meta["checkpoint_id"], cases_per_file, so, progress)
    if todo.num_rows:
        reader = CaseReader(todo, so, image_size, resize=meta["preprocess"]["interpolation"])
        ds = ray.data.read_datasource(reader, override_num_blocks=reader.read_task_count(), memory=READ_TASK_MEMORY,
                                      concurrency=reader.read_concurrency())
        cases_per_call = predictor_cases_per_call(args.num_gpus_per_actor, todo.num_rows, reader.read_task_count())
        ds = ds.map_batches(ScoreFrames, fn_constructor_kwargs={"checkpoint": args.checkpoint,
                                                                "batch_size": args.batch_size, "storage_options": so},
                            batch_size=cases_per_call, compute=predictor_pool(args.actors, args.num_gpus_per_actor),
                            num_gpus=args.num_gpus_per_actor, num_cpus=args.cpus_per_actor, batch_format="numpy")
        ds = ds.map_batches(summarise_cases, fn_kwargs={"threshold": meta["threshold"], "image_size": image_size},
                            batch_size=1, batch_format="numpy", num_cpus=WRITE_TASK_CPUS)
        with record.ProgressLog(progress, todo.num_rows, args.progress_seconds):
            ds.write_datasink(writer, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
        stages = ds.stats()
        print(stages, flush=True)
    ray.kill(progress)  # a driver that runs several jobs (tests, benchmarks) keeps no idle actor of each

    run = record.finish(run, listed.num_rows, resumed, writer.tallies, cases_per_file, stages,
                        time.perf_counter() - started)
    record.write_record(args.output, run, so)
    print(record.summary_line(run), flush=True)
    return 0


def predictor_pool(actors: int, gpus_per_actor: float) -> ray.data.ActorPoolStrategy:
    """`actors` predictor actors. A GPU actor runs two calls at once, each on its own CUDA stream
    (`FrameModel`): one case's copies and Ray's host work overlap the other's compute, so the GPU is fed.
    It scores on the GPU Ray assigned it, or on the CPU where torch sees no CUDA
    (`fetaliqa.inference.scoring_device`); a CPU actor always on the CPU, even on a GPU node.
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
