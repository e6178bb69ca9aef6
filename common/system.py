"""Facts about the machine this process runs on."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (taskset, cgroups, SLURM), not
    os.cpu_count(), which counts every core of the machine."""
    return max(1, len(os.sched_getaffinity(0)))
