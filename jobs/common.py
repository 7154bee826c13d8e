"""What every recipe shares: the `--storage-options` flag, starting or joining Ray, and turning expected
errors into one-line exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

import ray

from fetaliqa.errors import FetaliqaError

log = logging.getLogger("fetaliqa")


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """`--storage-options JSON`, the one definition every job uses."""
    parser.add_argument("--storage-options", type=_storage_options, default=None,
                        help='JSON object of fsspec options, e.g. {"endpoint_url": "http://127.0.0.1:9000"}; '
                             "credentials come from the standard AWS/fsspec chain, never from here")


def _storage_options(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def init_ray(local_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a fresh local Ray.

    A local Ray gets at least 8 logical CPUs even on a 2-core machine. Ray Train workers and Ray Data's
    read and map tasks each hold a CPU, and with too few logical CPUs the data pipeline waits forever for a
    CPU a worker holds; and Ray Data reserves each operator a share of the logical CPUs (half of them,
    split over the operators): with 4, the scoring job's read operator got under one task's CPU and decoded
    one case at a time (24 ACOUSLIC-size cases on 2 cores: read concurrency 0.97, the reads spanning 80 s;
    with 8: 3.5 reads at a time, 64 s, the whole execution 88 -> 83 s). Logical CPUs are scheduling slots, not cores, so
    oversubscribing is safe; read tasks also declare their memory, which bounds how many run at once.
    `address="local"` never joins a stale cluster left behind by an earlier run.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=local_cpus or max(8, os.cpu_count() or 1), include_dashboard=False)


def run_recipe(recipe: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
               argv: list[str] | None) -> int:
    """Parse `argv`, run `recipe`, and report a FetaliqaError as one line on stderr with exit code 2."""
    args = parser.parse_args(argv)
    # Libraries (open_clip, Ray) log their own INFO chatter to the root logger; show only their warnings.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        return recipe(args)
    except FetaliqaError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
