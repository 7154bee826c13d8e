"""Evaluate against the archive's annotations: `python -m jobs.evaluate (--scores URL | --predictions DIR) --data URL`.

--scores: frames/ + cases/ + errors/ of a `fetaliqa score` run, joined with the archive's masks (a frame is
positive when its mask is non-empty) and AC csv -> frame metrics at the run's own operating point
(`positive`), per sweep, fetaliqa's case metrics (WFSS; SEG: soft Dice, NAE of AC) and the ACOUSLIC-AI
challenge's own metrics ("acouslic") -> metrics.json and report.html with PNG plots under --output
(default: <scores>/evaluation).
--predictions: any algorithm's challenge-format outputs (DIR/<case_id>/fetal-abdomen-segmentation.mha and
fetal-abdomen-frame-number.json, as `fetaliqa export` writes them) -> the challenge's metrics only; --output
is required. A case whose prediction file is missing or malformed is listed under "excluded_cases" with
the file's one-line error.
--fov-mask: the FOV mask file of the challenge's metrics (the challenge's fov_mask.mha); without it, one is
derived from each case's image stack. Runs in this process; no Ray needed.
"""

from __future__ import annotations

import argparse
import sys
import time

from fetaliqa.errors import FetaliqaError
from fetaliqa.evaluation import report
from fetaliqa.inputs import storage
from jobs.common import add_storage_options, run_recipe


def build_parser(prog: str = "python -m jobs.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", help="output folder of `fetaliqa score` (local path or fsspec URL)")
    source.add_argument("--predictions", help="challenge-format predictions: DIR/<case_id>/fetal-abdomen-"
                                              "segmentation.mha and fetal-abdomen-frame-number.json")
    parser.add_argument("--data", required=True, help="the ACOUSLIC-layout archive that was scored (with masks)")
    parser.add_argument("--output", default=None, help="report folder (default: <scores>/evaluation; "
                                                       "required with --predictions)")
    parser.add_argument("--fov-mask", default=None, help="FOV mask image (e.g. the challenge's fov_mask.mha) for "
                                                         "the challenge's metrics; default: derived per case")
    parser.add_argument("--max-case-plots", type=int, default=report.MAX_CASE_PLOTS,
                        help="draw score traces for the first N cases (sorted by id)")
    add_storage_options(parser)
    return parser


def evaluate(args: argparse.Namespace) -> int:
    so = args.storage_options
    if args.predictions and not args.output:
        raise FetaliqaError("--output is required with --predictions")
    started = time.perf_counter()
    fov = report.Fov.from_url(args.fov_mask, so) if args.fov_mask else report.Fov()

    if args.predictions:
        result = report.evaluate_predictions(args.predictions, args.data, so, fov)   # read each case's files
    else:
        result = report.evaluate(args.scores, args.data, so, fov)            # join scores with masks; metrics
    output = args.output or storage.join(args.scores, "evaluation")
    page = report.write_report(result, output, so, args.max_case_plots)  # metrics.json, PNGs, report.html

    run, challenge = result.metrics["run"], result.metrics["acouslic"]["aggregate"]
    line = f"fetaliqa evaluate: {run['cases_evaluated']} cases"
    if not args.predictions:
        frame, cases = result.metrics["frame_metrics"], result.metrics["case_metrics"]["aggregate"]
        line += (f", {frame['n']} frames: F1 {frame['f1']:.3f} (precision {frame['precision']:.3f}, recall "
                 f"{frame['recall']:.3f}), selection score {cases['selection_score']:.3f}")
    print(f"{line}; {run['cases_excluded']} cases excluded; ACOUSLIC-AI score {_number(challenge['score'])} "
          f"(WFSS {_number(challenge['wfss'])}, Dice {_number(challenge['soft_dice'])}, NAE AC "
          f"{_number(challenge['nae_ac'])}); {time.perf_counter() - started:.1f} s -> {page}", flush=True)
    return 0


def _number(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3f}"  # metrics.json writes the challenge's inf as null


def main(argv: list[str] | None = None, prog: str = "python -m jobs.evaluate") -> int:
    return run_recipe(evaluate, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
