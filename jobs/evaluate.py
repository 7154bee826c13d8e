"""Evaluate a scoring run against the archive's annotations: `python -m jobs.evaluate --scores ... --data ...`.

frames/ + cases/ + errors/ of a `fetaliqa score` run, joined with the archive's masks (a frame is positive when
its mask is non-empty) and AC csv -> frame metrics at the run's own operating point (`positive`), per sweep,
and the ACOUSLIC case metrics (WFSS; SEG: soft Dice, NAE of AC) -> metrics.json and report.html with PNG
plots under --output (default: <scores>/evaluation). Runs in this process; no Ray needed.
"""

from __future__ import annotations

import argparse
import sys
import time

from fetaliqa import report, storage
from jobs.common import add_storage_options, run_recipe


def build_parser(prog: str = "python -m jobs.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="output folder of `fetaliqa score` (local path or fsspec URL)")
    parser.add_argument("--data", required=True, help="the ACOUSLIC-layout archive that was scored (with masks)")
    parser.add_argument("--output", default=None, help="report folder (default: <scores>/evaluation)")
    parser.add_argument("--max-case-plots", type=int, default=report.MAX_CASE_PLOTS,
                        help="draw score traces for the first N cases (sorted by id)")
    add_storage_options(parser)
    return parser


def evaluate(args: argparse.Namespace) -> int:
    so = args.storage_options
    output = args.output or storage.join(args.scores, "evaluation")
    started = time.perf_counter()

    result = report.evaluate(args.scores, args.data, so)             # join scores with masks; metrics
    page = report.write_report(result, output, so, args.max_case_plots)  # metrics.json, PNGs, report.html

    frame, cases, run = result.metrics["frame_metrics"], result.metrics["case_metrics"]["aggregate"], result.metrics["run"]
    print(f"fetaliqa evaluate: {run['cases_evaluated']} cases, {frame['n']} frames: F1 {frame['f1']:.3f} "
          f"(precision {frame['precision']:.3f}, recall {frame['recall']:.3f}), WFSS {cases['wfss']:.3f}; "
          f"{run['cases_excluded']} cases excluded; {time.perf_counter() - started:.1f} s -> {page}", flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.evaluate") -> int:
    return run_recipe(evaluate, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
