"""Starting or joining Ray the same way in every recipe."""

from __future__ import annotations

import os

import ray


def init_ray(local_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a fresh local Ray.

    A local Ray gets at least 4 logical CPUs even on a 2-core machine: Ray Train workers and Ray Data's
    read and map tasks each hold a CPU, and with too few logical CPUs the data pipeline waits forever
    for a CPU a worker holds. Logical CPUs are scheduling slots, not cores, so oversubscribing is safe.
    `address="local"` never joins a stale cluster left behind by an earlier run.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=local_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
