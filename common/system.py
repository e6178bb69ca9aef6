"""Facts about the machine this process runs on, each with one home.

    from common.system import usable_cores
    threads = usable_cores()            # CPU cores this process may run on
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, cgroup cpusets,
    a scheduler's binding), not the machine's total; at least 1. Who splits a node between
    several processes (local ranks) divides this number, not the cores of the whole job."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):      # no affinity API (macOS)
        return max(1, os.cpu_count() or 1)
