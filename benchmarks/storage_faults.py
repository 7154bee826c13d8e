"""Scoring through a flaky object store: what each retry policy makes of the same injected faults.

    .venv/bin/python benchmarks/storage_faults.py [--cases 24] [--rate 0.1] [--seed 19]

A tiny synthetic archive (`write_synthetic_archive(cases, frames_per_sweep=4, height=40, width=50, seed=1)`)
is written to a loopback S3 server (moto, tests/loopback_s3.py), then scored by `python -m jobs.score` in a
fresh process (`fetalclip-tiny` CLS, built here), with `--input` and `--output` through the fault proxy of
tests/fault_proxy.py: a seeded `--rate` of the requests, plus the first listing, read and write, get a
503 SlowDown, a 500 InternalError, a connection reset mid-body or a 2 s stall (at most 3), in turn.
Once per retry policy, each on a fresh proxy with the same seed and a fresh output:
  - "fetaliqa default": `{"endpoint_url": PROXY}` (fetaliqa.inputs.storage.S3_RETRY_DEFAULTS);
  - "botocore legacy default": `{"config_kwargs": {"retries": {"mode": "legacy", "max_attempts": 4}}}`,
    what a client got before fetaliqa set a policy (no AWS_RETRY_MODE / AWS config file);
  - "botocore retries off": `{"config_kwargs": {"retries": {"max_attempts": 0}}}` (s3fs's own retries remain).
Reports the job's exit code and wall time, the proxy's counts (requests, faults by kind, retries), and the
output read directly from the server: cases scored, errors/ rows by kind, rows lost, duplicate (case_id, frame)
rows, and commit records naming a missing file. Not a test: the suite's tests/test_storage_faults.py asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from fault_proxy import FaultProxy  # noqa: E402 - the suite's own proxy and S3 endpoint, on sys.path above
from loopback_s3 import LoopbackS3  # noqa: E402

FRAMES_PER_CASE = 24  # 6 sweeps x frames_per_sweep 4
# moto's dummies, valid nowhere else; in os.environ so that the job's driver and Ray workers inherit them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "fetaliqa-bench-key", "AWS_SECRET_ACCESS_KEY": "fetaliqa-bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
POLICIES = {"fetaliqa default": {},
            "botocore legacy default": {"config_kwargs": {"retries": {"mode": "legacy", "max_attempts": 4}}},
            "botocore retries off": {"config_kwargs": {"retries": {"max_attempts": 0}}}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--rate", type=float, default=0.1, help="share of requests faulted at random")
    parser.add_argument("--seed", type=int, default=19)
    return parser


def checkpoint(folder: str) -> str:
    from fetaliqa.models import DEFAULT_THRESHOLD, build_model, save_checkpoint

    model, preprocess = build_model("fetalclip-tiny", "cls", seed=11)
    save_checkpoint(model, folder, threshold=DEFAULT_THRESHOLD["cls"], preprocess=preprocess)
    return folder


def outcome(output: str, direct: dict, case_ids: list[str]) -> dict:
    """What a run left in `output`, read from the server without faults."""
    from fetaliqa.inputs import storage
    from fetaliqa.score import ledger
    from fetaliqa.score.ledger import read_table
    from fetaliqa.score.schema import CASES, ERRORS, FRAMES

    fs, root = storage.filesystem(output, direct)
    if not fs.exists(f"{root}/_fetaliqa"):
        return {"cases scored": 0, "errors rows": {}, "rows lost": len(case_ids) * FRAMES_PER_CASE,
                "duplicates": 0, "records naming a missing file": 0}
    frames = read_table(output, FRAMES, direct)
    keys = Counter(zip(frames["case_id"].to_pylist(), frames["frame"].to_pylist()))
    records = ledger.load_records(output, direct)
    return {"cases scored": read_table(output, CASES, direct).num_rows,
            "errors rows": dict(Counter(read_table(output, ERRORS, direct)["error"].to_pylist())),
            "rows lost": len(case_ids) * FRAMES_PER_CASE - len(keys),
            "duplicates": sum(n - 1 for n in keys.values()),
            "records naming a missing file": sum(not all(fs.exists(f"{root}/{p}") for p in r["files"].values())
                                                 for r in records)}


def run(policy: str, server: LoopbackS3, ckpt: str, case_ids: list[str], args: argparse.Namespace) -> dict:
    proxy = FaultProxy(server.url, rate=args.rate, seed=args.seed, max_stalls=3,
                       force_first=("LIST", "GET object", "PUT object"))
    output = f"s3://bench/scores-{policy.replace(' ', '-')}"
    options = {"endpoint_url": proxy.url, **POLICIES[policy]}
    started = time.perf_counter()
    job = subprocess.run([sys.executable, "-m", "jobs.score", "--input", "s3://bench/archive", "--checkpoint", ckpt,
                          "--output", output, "--storage-options", json.dumps(options)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    proxy.stop()
    stderr = [line for line in job.stderr.splitlines() if line.strip()]
    return {"policy": policy, "exit": job.returncode, "wall s": round(wall, 1),
            "requests": sum(proxy.requests.values()), "faults": proxy.faults_by_kind(), "retries": proxy.retries,
            "never retried": len(proxy.unanswered), **outcome(output, {"endpoint_url": server.url}, case_ids),
            "last stderr line": stderr[-1][:160] if job.returncode else ""}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.update(S3_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request it answers
    from fetaliqa.inputs import storage
    from fetaliqa.synthetic.archive import write_synthetic_archive

    server = LoopbackS3()
    direct = {"endpoint_url": server.url}
    storage.filesystem("s3://bench", direct)[0].mkdir("bench")
    with tempfile.TemporaryDirectory(prefix="fetaliqa-faults-") as tmp:
        ckpt = checkpoint(f"{tmp}/checkpoint")
        case_ids = write_synthetic_archive("s3://bench/archive", cases=args.cases, frames_per_sweep=4, height=40,
                                           width=50, seed=1, storage_options=direct)
        results = [run(policy, server, ckpt, case_ids, args) for policy in POLICIES]
    server.stop()
    columns = list(results[0])
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in results]
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
