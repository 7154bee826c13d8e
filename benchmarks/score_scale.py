"""Scoring at archive scale: what `jobs.score` costs per case as the archive grows, on disk and on S3.

    .venv/bin/python benchmarks/score_scale.py [--cases 1000 10000] [--data benchmarks/data]
        [--output benchmarks/RESULTS-scale.md] [--no-s3]

For each N, an archive of N tiny cases (6 frames of 48 x 64: `write_synthetic_archive(frames_per_sweep=1,
height=48, width=64, seed=3)`, cached under `--data`) is scored with `fetalclip-micro` (CLS), so that the
figures are the job's per-case overhead (listing, tasks, blocks, commits), not decoding or the model.
Each run is `python -m jobs.score` in a fresh process from the repository root (its own driver and local
Ray), and reports:
  - wall time (process start to exit) and run.json's `seconds`; wall time / N;
  - steady state, from the commit records `_fetaliqa/parts/*.json`: (cases of every part but the first
    committed) / (last commit - first commit), as ms per case; and the first commit's delay after the
    process started (start-up: imports, Ray, the predictor actor's model, the first part);
  - parts, and files per table (`frames/`, `cases/`, `errors/`) against the job's bound max(10, N/50);
  - the driver's peak RSS (VmHWM of its /proc status, polled every 0.2 s; Ray's own processes not included).
Then (unless `--no-s3`) the same run with `--input`, `--checkpoint` and `--output` on a loopback S3
server (moto) that counts every request it answers during the run: total, per case and by kind (LIST =
GET with `list-type`; GET/PUT/HEAD/DELETE of an object; bucket-level). On S3 the commit times are when the
server received each record's PUT (S3's LastModified has one-second resolution).
Not a test: timings belong here, not in the suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from loopback_s3 import LoopbackS3, request_kind  # noqa: E402 - the suite's own S3 endpoint, on sys.path above
IMAGES = "images/stacked_fetal_ultrasound"
PARTS = "_fetaliqa/parts"
TABLES = ("frames", "cases", "errors")
UPLOAD_CHUNK = 500  # objects per s3fs pipe call: bounded memory, few round trips
# moto's dummies, valid nowhere else; in os.environ so that the job's driver and Ray workers inherit them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "fetaliqa-bench-key", "AWS_SECRET_ACCESS_KEY": "fetaliqa-bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


class Run(NamedTuple):  # not a dataclass: tests/test_readme.py loads this file outside sys.modules
    n: int
    store: str
    wall: float
    seconds: float
    steady_ms: float
    first_commit: float
    parts: int
    files: dict[str, int]
    rss_mib: float
    requests: Counter | None = None


def tiny_archive(data: Path, n: int) -> Path:
    """The cached archive of `n` tiny cases; written once (its circumferences CSV comes last)."""
    from fetaliqa.synthetic.archive import write_synthetic_archive

    root = data / f"tiny-{n}"
    csv = root / "circumferences" / "fetal_abdominal_circumferences_per_sweep.csv"
    if not csv.exists() or len(list((root / IMAGES).glob("*.mha"))) != n:
        shutil.rmtree(root, ignore_errors=True)
        write_synthetic_archive(str(root), cases=n, frames_per_sweep=1, height=48, width=64, seed=3)
    return root


def micro_checkpoint(work: Path) -> Path:
    from fetaliqa.models import DEFAULT_THRESHOLD, build_model, save_checkpoint

    model, preprocess = build_model("fetalclip-micro", "cls", seed=11)
    url = work / "checkpoint-micro"
    save_checkpoint(model, str(url), threshold=DEFAULT_THRESHOLD["cls"], preprocess=preprocess)
    return url


def run_job(source: str, checkpoint: str, out: str, options: dict | None, log: Path) -> tuple[float, float, float]:
    """`python -m jobs.score` in a fresh process -> (start time, wall seconds, driver peak RSS in MiB)."""
    argv = [sys.executable, "-m", "jobs.score", "--input", source, "--checkpoint", checkpoint, "--output", out]
    if options:
        argv += ["--storage-options", json.dumps(options)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, never a cluster someone has running
    with log.open("w") as sink:
        started = time.time()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        rss_kib = 0
        while proc.poll() is None:
            rss_kib = _vm_hwm(proc.pid) or rss_kib  # the last value read: VmHWM only grows
            time.sleep(0.2)
        wall = time.time() - started
    if proc.returncode:
        raise RuntimeError(f"jobs.score exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return started, wall, rss_kib / 1024


def _vm_hwm(pid: int) -> int | None:
    """The process's peak resident set (kB), None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def steady_state(commits: list[tuple[float, int]], started: float) -> tuple[float, float]:
    """(ms per case after the first commit, seconds from `started` to the first commit) from
    (commit time, cases) pairs; nan when fewer than two parts committed."""
    commits = sorted(commits)
    span = commits[-1][0] - commits[0][0] if commits else 0.0
    after_first = sum(cases for _, cases in commits[1:])
    steady = 1000 * span / after_first if after_first and span > 0 else math.nan
    return steady, (commits[0][0] - started if commits else math.nan)


def output_summary(out: str, options: dict | None) -> tuple[dict, dict[str, int], dict[str, int]]:
    """(run.json, {part: cases scored}, {table: files}) of a finished output, local or on S3."""
    from fetaliqa.inputs import storage

    fs, root = storage.filesystem(out, options)
    run = json.loads(fs.cat_file(f"{root}/run.json"))
    records = [json.loads(fs.cat_file(p)) for p in _names(fs, f"{root}/{PARTS}") if p.endswith(".json")]
    files = {t: sum(p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")
                    for p in _names(fs, f"{root}/{t}")) for t in TABLES}
    return run, {r["part"]: len(r["scored"]) for r in records}, files


def _names(fs, path: str) -> list[str]:
    try:
        return fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []


def score_local(n: int, archive: Path, checkpoint: Path, work: Path) -> Run:
    out = work / f"local-{n}"
    started, wall, rss = run_job(str(archive), str(checkpoint), str(out), None, work / f"local-{n}.log")
    run, parts, files = output_summary(str(out), None)
    # A record is written through a temporary file and a rename: its mtime is its commit time.
    commits = [((out / PARTS / f"{part}.json").stat().st_mtime, cases) for part, cases in parts.items()]
    steady, first = steady_state(commits, started)
    return Run(n, "local", wall, run["seconds"], steady, first, len(parts), files, rss)


def upload(fs, bucket: str, archive: Path, checkpoint: Path) -> None:
    """The archive's images and the checkpoint into `bucket`, ~500 objects a request batch."""
    images = sorted((archive / IMAGES).glob("*.mha"))
    for at in range(0, len(images), UPLOAD_CHUNK):
        fs.pipe({f"{bucket}/archive/{IMAGES}/{p.name}": p.read_bytes() for p in images[at:at + UPLOAD_CHUNK]})
    # fetaliqa.json last: its presence marks a complete checkpoint.
    for path in sorted(checkpoint.iterdir(), key=lambda p: p.name == "fetaliqa.json"):
        fs.pipe({f"{bucket}/checkpoint/{path.name}": path.read_bytes()})


def score_s3(n: int, archive: Path, checkpoint: Path, work: Path, server: LoopbackS3) -> Run:
    import s3fs

    options = {"client_kwargs": {"endpoint_url": server.url}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    bucket = f"fetaliqa-scale-{n}"
    fs.mkdir(bucket)
    upload(fs, bucket, archive, checkpoint)
    server.take()  # count the scoring run only
    out = f"s3://{bucket}/out"
    started, wall, rss = run_job(f"s3://{bucket}/archive", f"s3://{bucket}/checkpoint", out, options,
                                 work / f"s3-{n}.log")
    requests = server.take()
    run, parts, files = output_summary(out, options)
    put_at = {r.path.rsplit("/", 1)[-1].removesuffix(".json"): r.time for r in requests
              if r.method == "PUT" and f"/{PARTS}/" in r.path}
    steady, first = steady_state([(put_at[part], cases) for part, cases in parts.items()], started)
    fs.rm(bucket, recursive=True)  # moto holds objects in this process's memory
    return Run(n, "S3", wall, run["seconds"], steady, first, len(parts), files, rss,
               Counter(request_kind(r) for r in requests))


def table(runs: list[Run]) -> list[str]:
    lines = ["| N | store | wall s | run.json s | ms/case end to end | ms/case steady | first commit after s | parts "
             "| files frames/cases/errors (bound) | driver peak RSS MiB | requests | requests/case | by kind |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        bound = max(10, math.ceil(r.n / 50))
        files = "/".join(str(r.files[t]) for t in TABLES)
        total = sum(r.requests.values()) if r.requests is not None else None
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.requests.items())) if r.requests else "-"
        lines.append(f"| {r.n:,} | {r.store} | {r.wall:.1f} | {r.seconds:.1f} | {1000 * r.wall / r.n:.1f} "
                     f"| {r.steady_ms:.1f} | {r.first_commit:.1f} | {r.parts} | {files} ({bound}) | {r.rss_mib:.0f} "
                     f"| {'-' if total is None else total} | {'-' if total is None else f'{total / r.n:.2f}'} | {kinds} |")
    return lines


def report(runs: list[Run]) -> list[str]:
    interpreter = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        "# Scoring at archive scale", "",
        f"Command: `{shlex.join([interpreter, *sys.argv])}`. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{gib:.0f} GiB; Ray {version('ray')}, torch {version('torch')}. Archives of N synthetic cases of 6 frames "
        "of 48 x 64; fetalclip-micro (CLS); `python -m jobs.score` in a fresh process each run.", "",
        *table(runs), "",
        "Wall time: process start to exit (imports, Ray start and shutdown included); end to end = wall / N. "
        "Steady: (last - first commit) / cases after the first part. First commit: seconds after the process "
        "started. Driver RSS: the driver process's VmHWM, without Ray's processes. Requests: every request "
        "the S3 server answered during the run (listing, checkpoint, images, outputs, records).", "",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, nargs="+", default=[1000, 10000], help="archive sizes N (cases)")
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"), help="where archives are cached")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-scale.md"))
    parser.add_argument("--no-s3", action="store_true", help="skip the runs on the loopback S3 server")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    os.environ.update(S3_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a log line per S3 request
    work = Path(tempfile.mkdtemp(prefix="fetaliqa-scale-"))
    checkpoint = micro_checkpoint(work)
    server = None if args.no_s3 else LoopbackS3()
    runs = []
    try:
        for n in args.cases:
            archive = tiny_archive(args.data.resolve(), n)
            runs.append(score_local(n, archive, checkpoint, work))
            if server:
                runs.append(score_s3(n, archive, checkpoint, work, server))
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    lines = report(runs)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
