"""Facts about the machine this process runs on, each with one home.

    from common.system import usable_cores, versions, machine
    threads = usable_cores()            # CPU cores this process may run on
    versions(("numpy", "pillow"))       # {"python": "3.12.3", "numpy": "2.1.0", "pillow": ...}
    machine(["cuda:0"])                 # CPU model, cores, GPUs, versions, date: a bench's header
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

# What a loader or model number depends on; "nvidia-dali*" matches whichever CUDA build is installed.
LIBRARIES = ("torch", "nvidia-dali*", "ffcv", "numba", "numpy", "pillow", "opencv-python")


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, cgroup cpusets,
    a scheduler's binding), not the machine's total; at least 1. Who splits a node between
    several processes (local ranks) divides this number, not the cores of the whole job."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):      # no affinity API (macOS)
        return max(1, os.cpu_count() or 1)


def versions(dists: Sequence[str] = LIBRARIES) -> dict[str, str | None]:
    """The Python version and each distribution's installed version (None: not installed).
    A name ending in "*" is a prefix ("nvidia-dali*" -> nvidia-dali-cuda120 2.4.0), reported
    under the installed name."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
        names = _installed_with_prefix(dist[:-1]) if dist.endswith("*") else [dist]
        for name in names or [dist[:-1]]:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def _installed_with_prefix(prefix: str) -> list[str]:
    """Installed distributions whose name starts with ``prefix``, from the names of the
    ``*.dist-info`` folders on sys.path: parsing every installed distribution's metadata
    instead would be paid by every command that records versions."""
    key = re.sub(r"[-_.]+", "_", prefix).lower()
    found = set()
    for entry in sys.path:
        try:
            for info in Path(entry or ".").glob("*.dist-info"):
                name = info.name[:-len(".dist-info")].rsplit("-", 1)[0]
                if name.lower().startswith(key):
                    found.add(name.lower().replace("_", "-"))
        except OSError:
            continue
    return sorted(found)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(devices: Iterable[str] = (), dists: Sequence[str] = LIBRARIES) -> dict:
    """What a benchmark number depends on: CPU model, usable cores, the GPU behind each CUDA
    device in ``devices``, library versions, and the date (UTC, to the second)."""
    gpus = [str(d) for d in devices if str(d).startswith("cuda")]
    names = None
    if gpus:
        import torch
        names = [torch.cuda.get_device_name(torch.device(d)) for d in gpus]
    return {"cpu": cpu_model(), "cores": usable_cores(), "gpu": ", ".join(names) if names else None,
            "versions": versions(dists),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
