"""The morning report of a scoring run: `python -m jobs.report --scores URL [--case-info URL] [--output URL]`.

For any `fetaliqa score` output, annotated or not: a decision per case (usable: some frame reached the
checkpoint's threshold; rescan: none), shares usable by site, device and month with 95% Wilson intervals
(sites ranked worst first), sweep coverage, score distributions, AC with gestational age and growth centiles
(SEG runs), a review gallery of the chosen frames, errors by kind. Writes report.html, summary.json (every figure
on the page), rescan.csv and the images under --output (default: <scores>/morning). Reads committed parts only,
with DuckDB, in this process; no Ray needed.
--case-info: a CSV or Parquet keyed by case_id with any of site, device, date (YYYY-MM-DD), ga_weeks; its
site, device and date take precedence over the DICOM headers' InstitutionName, Manufacturer + model and StudyDate.
"""

from __future__ import annotations

import argparse
import sys
import time

from fetaliqa.evaluation import run_report
from fetaliqa.inputs import storage
from jobs.common import add_storage_options, run_recipe


def build_parser(prog: str = "python -m jobs.report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="output folder of `fetaliqa score` (local path or fsspec URL)")
    parser.add_argument("--case-info", default=None, help="CSV or Parquet keyed by case_id: site, device, date, ga_weeks")
    parser.add_argument("--output", default=None, help="report folder (default: <scores>/morning)")
    parser.add_argument("--gallery-rescan", type=int, default=run_report.GALLERY_RESCAN_CAP,
                        help="show at most N rescan cases' best frames, nearest the threshold first")
    parser.add_argument("--gallery-usable", type=int, default=run_report.GALLERY_USABLE_SAMPLE,
                        help="show a random sample of N usable cases' best frames")
    parser.add_argument("--seed", type=int, default=0, help="seed of the usable cases' sample")
    parser.add_argument("--min-cases-to-rank", type=int, default=run_report.MIN_CASES_TO_RANK,
                        help="rank only sites with at least N cases")
    add_storage_options(parser)
    return parser


def report(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output = args.output or storage.join(args.scores, "morning")
    summary = run_report.write_run_report(args.scores, output, args.case_info, args.storage_options,
                                          args.gallery_rescan, args.gallery_usable, args.seed, args.min_cases_to_rank)
    overall = summary["decisions"]["overall"]
    low, high = overall["ci95"]
    usable = "n/a" if overall["share"] is None else f"{100 * overall['share']:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%]"
    print(f"fetaliqa report: {overall['cases']} cases, {overall['usable']} usable ({usable}), "
          f"{summary['decisions']['rescan']} to rescan, {summary['output']['failed_cases']} failed; "
          f"{time.perf_counter() - started:.1f} s -> {storage.join(output, 'report.html')}", flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.report") -> int:
    return run_recipe(report, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
