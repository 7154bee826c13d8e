"""Score every frame of a sweep archive on Ray and write Parquet: `python -m jobs.score --input ... --checkpoint ... --output ...`.

read (CPU tasks: fsspec -> SimpleITK -> 224x224 frames) -> Predictor actors (model on GPU or CPU)
-> CaseWriter (threshold, masks to native size, Parquet per case) -> one summary line.
Rerunning into the same --output skips the cases already complete.
"""

from __future__ import annotations

import argparse
import sys
import time

import ray

from fetaliqa import outputs
from fetaliqa.archive import list_cases
from fetaliqa.models import load_checkpoint
from fetaliqa.runner import run_recipe, storage_options_arg
from fetaliqa.runtime import init_ray
from fetaliqa.inference import Predictor
from fetaliqa.scoring import READ_TASK_MEMORY, WRITE_TASK_CPUS, WRITERS_PER_ACTOR, CaseWriter, read_case_row


def build_parser(prog: str = "python -m jobs.score") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="archive root, folder of stacked images, or .txt list of URIs")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (local path or fsspec URL)")
    parser.add_argument("--output", required=True, help="output folder (local path or fsspec URL)")
    parser.add_argument("--actors", type=int, default=1, help="predictor actors (model replicas)")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per forward pass")
    parser.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per predictor actor (0: CPU)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per predictor actor")
    parser.add_argument("--storage-options", type=storage_options_arg, default=None,
                        help='JSON object for fsspec, e.g. {"endpoint_url": "http://127.0.0.1:9000"}')
    return parser


def score(args: argparse.Namespace) -> int:
    so = args.storage_options
    _, meta = load_checkpoint(args.checkpoint, storage_options=so)  # a bad checkpoint fails before any work
    done = outputs.completed_case_ids(args.output, so)
    cases = [c for c in list_cases(args.input, so) if c.case_id not in done]
    init_ray()
    started = time.perf_counter()

    ds = ray.data.from_items([{"case_id": c.case_id, "source": c.image_uri} for c in cases],
                             override_num_blocks=max(1, len(cases)))
    ds = ds.map(read_case_row, fn_kwargs={"storage_options": so, "image_size": meta["preprocess"]["image_size"]},
                memory=READ_TASK_MEMORY)
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"checkpoint": args.checkpoint, "batch_size": args.batch_size,
                                                          "storage_options": so},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=args.actors),
                        num_gpus=args.num_gpus_per_actor, num_cpus=args.cpus_per_actor, batch_format="numpy")
    ds = ds.map(CaseWriter(args.output, meta["threshold"], meta["checkpoint_id"], so),
                num_cpus=WRITE_TASK_CPUS, concurrency=WRITERS_PER_ACTOR * args.actors)

    tally = [row for row in ds.iter_rows()] if cases else []
    seconds = time.perf_counter() - started
    frames = sum(r["frames"] for r in tally)
    print(f"fetaliqa score: {sum(not r['error'] for r in tally)} cases scored ({len(done)} already complete), "
          f"{frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.1f} frames/s), "
          f"{sum(r['positives'] for r in tally)} positive frames, {sum(bool(r['error']) for r in tally)} errors "
          f"-> {args.output}", flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.score") -> int:
    return run_recipe(score, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
