"""Score every frame of a sweep archive on Ray and write Parquet: `python -m jobs.score --input ... --checkpoint ... --output ...`.

ReadCases (CPU tasks: fsspec -> SimpleITK, or pydicom for DICOM studies -> 224x224 frames) -> ScoreFrames (actors holding the model, GPU
or CPU) -> summarise_cases (CPU: masks to native size, PNGs, AC) -> WriteParts (Parquet parts of many cases,
each committed by a record). Rerunning the same command after any failure finishes the archive: complete
cases are skipped, nothing is scored twice (`fetaliqa.score.ledger`). One run at a time per output: a second
run, or --overwrite, while the first is alive is refused (`fetaliqa.score.lease`).
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
from fetaliqa.score import lease, ledger, record
from fetaliqa.score.predict import ScoreFrames
from fetaliqa.score.read import READ_TASK_MEMORY, CaseReader, list_archive, listing_notes
from fetaliqa.score.write import WRITE_TASK_CPUS, PartWriter, summarise_cases
from jobs.common import add_storage_options, init_ray, run_recipe

# A part holds up to 50 cases (42,000 frames of ACOUSLIC): an archive of N cases gets at most
# max(10, N / 50) files per table, and a failure loses at most the parts being written.
MAX_CASES_PER_FILE = 50


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
    held = lease.Lease(args.output, run["run_id"], so)
    took_over = held.take()  # before the output changes: a live run's output is refused, untouched
    if took_over:
        run["notes"].append(took_over)
        print(f"note: {took_over}", flush=True)
    with held.hold():
        if args.overwrite:
            ledger.reset(args.output, so)
        resumed = ledger.resume(args.output, so)
        todo = listed.filter(pc.invert(pc.is_in(listed["case_id"], pa.array(sorted(resumed.scored), pa.string()))))
        cases_per_file = args.cases_per_file or min(max(math.ceil(todo.num_rows / 10), 1), MAX_CASES_PER_FILE)
        record.write_record(args.output, run, so)
        init_ray()
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()  # job logs: `ProgressLog`

        image_size, stages = meta["preprocess"]["image_size"], ""
        progress = record.Progress.remote()
        writer = PartWriter(args.output, run["run_id"], meta["checkpoint_id"], cases_per_file, so, progress)
        if todo.num_rows:
            reader = CaseReader(todo, so, image_size, resize=meta["preprocess"]["interpolation"])
            ds = ray.data.read_datasource(reader, override_num_blocks=reader.read_task_count(),
                                          memory=READ_TASK_MEMORY, concurrency=reader.read_concurrency())
            ds = ds.map_batches(ScoreFrames, fn_constructor_kwargs={"checkpoint": args.checkpoint,
                                                                    "batch_size": args.batch_size,
                                                                    "storage_options": so},
                                batch_size=None, compute=predictor_pool(args.actors, args.num_gpus_per_actor),
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
        held.refresh()  # `LeaseLostError` if another run took the output over meanwhile: not marked complete
        record.write_record(args.output, run, so)
    print(record.summary_line(run), flush=True)
    return 0


def predictor_pool(actors: int, gpus_per_actor: float) -> ray.data.ActorPoolStrategy:
    """`actors` predictor actors. A GPU actor runs two calls at once, each on its own CUDA stream
    (`FrameModel`): one case's copies and Ray's host work overlap the other's compute, so the GPU is fed.
    A CPU actor runs one: two would share its cores."""
    if gpus_per_actor > 0:
        return ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2,
                                          enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(size=actors)


def main(argv: list[str] | None = None, prog: str = "python -m jobs.score") -> int:
    return run_recipe(score, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
