"""Write a scoring run as ACOUSLIC-AI challenge-format predictions: `python -m jobs.export --scores URL --output DIR`.

cases/ + frames/ of a `fetaliqa score` run -> for each scored case, DIR/<case_id>/fetal-abdomen-segmentation.mha
(a T x H x W uint8 stack of the scored image's shape, zero but for the selected frame's mask: SEG the frame's
mask_png, CLS empty) and DIR/<case_id>/fetal-abdomen-frame-number.json (the selected frame: the highest-scoring
frame when positive, else -1). `fetaliqa evaluate --predictions DIR` on the export gives the same challenge
metrics as `fetaliqa evaluate --scores` on the run. Cases in errors/ are not written. Runs in this process.
"""

from __future__ import annotations

import argparse
import sys
import time

from fetaliqa.evaluation.challenge_format import export_run
from jobs.common import add_storage_options, run_recipe


def build_parser(prog: str = "python -m jobs.export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="output folder of `fetaliqa score` (local path or fsspec URL)")
    parser.add_argument("--output", required=True, help="predictions folder to write (local path or fsspec URL)")
    add_storage_options(parser)
    return parser


def export(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    written = export_run(args.scores, args.output, args.storage_options)  # one case at a time
    print(f"fetaliqa export: {written['cases']} {written['task'].upper()} cases, {written['selected']} with a "
          f"selected frame; {time.perf_counter() - started:.1f} s -> {args.output}", flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.export") -> int:
    return run_recipe(export, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
