"""The morning report at archive scale: `fetaliqa report` on a 100,000-case scoring output, time and memory.

    .venv/bin/python benchmarks/report_scale.py [--cases 100000] [--repeats 3] [--data /tmp/fetaliqa-report-scale]
        [--output benchmarks/RESULTS-report.md]

Writes (once, cached under `--data`) a SEG scoring output in the documented layout: `cases/` and `errors/` parts
of 50 cases committed through `fetaliqa.score.ledger.write_part` (as `score` writes an archive of that size:
N/50 parts), run.json, and a case-info CSV with every case's site, date and gestational age. Each case carries
a 224 x 224 JPEG of speckle (about 14 kB; drawn from a pool of 64 distinct images), DICOM context (20
institutions, 3 devices, study dates over 12 months), a decision (usable share 60-95% by site), usable sweeps and
an AC. No `frames/`: the report does not read it. 0.5% of the cases are `errors/` rows instead.
Then runs `python -m jobs.report --scores ... --case-info ...` `--repeats` times, each in a fresh process, and
reports its wall time, the peak resident memory of that process (VmHWM of /proc/<pid>/status: DuckDB's threads
included, polled every 0.1 s), and the sizes of report.html and of the whole report folder.
Targets (issue 21): at most 60 s and 2 GiB resident on a 2-core machine, report.html at most 20 MB at any scale.
Not a test: timings belong here, not in the suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from handmade_runs import case_row, error_row, jpeg, run_record, write_run  # noqa: E402 - the suite's run writer

from fetaliqa.evaluation.growth import intergrowth_ac_mean_sd_mm  # noqa: E402

RUN_ID = "20260301T220000-bench0"
SITES, MONTHS = 20, 12
DEVICES = [("Acme", "U1"), ("Acme", "U2"), ("Beta", "V9")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000, help="cases in the scoring output")
    parser.add_argument("--repeats", type=int, default=3, help="report runs, each in a fresh process")
    parser.add_argument("--data", type=Path, default=Path("/tmp/fetaliqa-report-scale"), help="where the output is cached")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-report.md"))
    return parser


def write_output(folder: Path, n: int) -> tuple[Path, Path]:
    """The scoring output of `n` cases and its case-info CSV under `folder` (kept: written once per size)."""
    scores, info = folder / f"scores-{n}", folder / f"case-info-{n}.csv"
    if (scores / "run.json").exists() and info.exists():
        return scores, info
    rng = np.random.default_rng(0)
    pool = [jpeg(seed) for seed in range(64)]
    site = rng.integers(0, SITES, n)
    usable = rng.random(n) < 0.6 + 0.35 * site / (SITES - 1)
    ga = rng.uniform(18, 40, n).round(1)
    mean, sd = intergrowth_ac_mean_sd_mm(ga)
    ac = mean + sd * rng.normal(0, 1.1, n)  # a little wider than the standard: some cases outside 10th-90th
    cases, errors, lines = [], [], ["case_id,site,date,ga_weeks"]
    for i in range(n):
        case_id = f"case-{i:07d}"
        if i % 200 == 199:
            errors.append(error_row(case_id, "truncated", RUN_ID))
            continue
        sweeps = sorted(set(rng.choice(6, rng.integers(1, 4), replace=False) + 1)) if usable[i] else []
        month = f"2025-{1 + i % MONTHS:02d}"
        manufacturer, model = DEVICES[i % len(DEVICES)]
        cases.append(case_row(case_id, [int(s) for s in sweeps], 0.3 + 0.6 * rng.random() if sweeps else 0.3 * rng.random(),
                              RUN_ID, positives=int(rng.integers(1, 40)) if sweeps else 0, best_frame=int(rng.integers(0, 840)),
                              frames=840, ac_mm=float(ac[i]) if sweeps else None,
                              best_frame_image=pool[i % len(pool)], study_date=f"{month}-15",
                              institution=f"Hospital {site[i]:02d}", station=f"US-{site[i]:02d}-{i % 3}",
                              manufacturer=manufacturer, device_model=model))
        lines.append(f"{case_id},Site {site[i]:02d},{month}-15,{ga[i]}")
    write_run(str(scores), run_record(RUN_ID, task="seg", cases={"listed": n, "skipped": 0, "scored": len(cases),
                                                                 "failed": len(errors), "retried": 0}),
              cases, errors, cases_per_part=50)
    info.write_text("\n".join(lines) + "\n")
    return scores, info


def run_report(scores: Path, info: Path, output: Path) -> dict:
    """One `python -m jobs.report` in a fresh process: wall time (s), peak RSS (bytes), its summary line."""
    command = [sys.executable, "-m", "jobs.report", "--scores", str(scores), "--case-info", str(info),
               "--output", str(output)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, _vm_hwm(process.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    out = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"report failed ({process.returncode}): {out[-2000:]}")
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    return {"wall": wall, "peak": peak, "html": (output / "report.html").stat().st_size, "folder": size,
            "files": sum(1 for _ in output.rglob("*")), "line": out.strip().splitlines()[-1]}


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def main() -> None:
    args = build_parser().parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scores, info = write_output(args.data, args.cases)
    written = time.perf_counter() - started
    on_disk = sum(f.stat().st_size for f in scores.rglob("*") if f.is_file())
    runs = [run_report(scores, info, args.data / f"report-{i}") for i in range(args.repeats)]
    load = os.getloadavg()
    lines = [
        "# The morning report at scale (benchmarks/report_scale.py)", "",
        f"Command: `.venv/bin/python benchmarks/report_scale.py {shlex.join(sys.argv[1:])}`".replace("` ", "`"), "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"duckdb {version('duckdb')}, pyarrow {version('pyarrow')}. Load average after the runs: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.", "",
        f"Output: {args.cases:,} cases (SEG), {len(list((scores / 'cases').iterdir())):,} cases/ parts of 50, "
        f"{on_disk / 2**30:.2f} GiB on disk (best-frame JPEGs of ~14 kB), case-info CSV of every case; written in "
        f"{written:.1f} s (0 when cached).", "",
        "| run | wall (s) | peak RSS (MiB) | report.html (kB) | report folder (MB) | files |",
        "|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['wall']:.1f} | {r['peak'] / 2**20:.0f} | {r['html'] / 1e3:.0f} | "
              f"{r['folder'] / 1e6:.1f} | {r['files']} |" for i, r in enumerate(runs)]
    lines += ["", f"Its line: `{runs[-1]['line']}`", ""]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
