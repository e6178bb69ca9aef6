"""Where a training step's time goes: data wait, host→device, forward, backward, optimiser.

``Phases`` is used by the training loop on every step. Off (the default) it is a no-op
context manager. With ``--profile`` it synchronises the model's CUDA devices at each phase
boundary (otherwise a phase's GPU work would be billed to whichever later phase happens to
block) and wraps each phase in an NVTX range (``torch.cuda.nvtx``) so Nsight Systems shows
the same names, plus a ``torch.profiler`` ``record_function`` label for the Chrome trace.
The data stall is the data-wait share of the step time: the time the model sat idle
waiting for the loader.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch

from common.devices import sync

PHASES = ("data", "h2d", "forward", "backward", "optimizer")


class Phases:
    def __init__(self, enabled: bool, devices: list[str]):
        self.enabled = enabled
        self.cuda = [torch.device(d) for d in devices if d.startswith("cuda")]
        self.seconds: dict[str, float] = defaultdict(float)
        self.images = 0

    def _sync(self) -> None:
        sync(self.cuda)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        nvtx = bool(self.cuda)
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                yield
                self._sync()
        finally:
            self.seconds[name] += time.perf_counter() - start
            if nvtx:
                torch.cuda.nvtx.range_pop()

    def add_images(self, images: int) -> None:
        self.images += images

    def summary(self, steps: int) -> dict:
        """Per-phase ms/step and share of the step, images/s, data-stall % (from the phases
        alone) over the ``steps`` steps timed (the run's step counter tells how many)."""
        total = sum(self.seconds[p] for p in PHASES)
        per = max(steps, 1)
        phases = {p: {"ms_per_step": 1000 * self.seconds[p] / per,
                      "percent": 100 * self.seconds[p] / total if total else 0.0} for p in PHASES}
        return {"steps": steps, "images": self.images,
                "step_ms": 1000 * total / per,
                "images_per_s": self.images / total if total else 0.0,
                "data_stall_percent": phases["data"]["percent"], "phases": phases}


def trace_profiler(enabled: bool, out_dir: Path | None, active_steps: int = 3):
    """A torch.profiler that records ``active_steps`` steps after one warm-up step and writes a
    Chrome trace (``trace.json``, open in chrome://tracing or Perfetto) into the run folder.

    Call ``.step()`` once per training step. A null context when profiling is off.
    """
    if not enabled or out_dir is None:
        return NullProfiler()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path = Path(out_dir) / "trace.json"

    def export(prof) -> None:
        prof.export_chrome_trace(str(path))

    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=active_steps, repeat=1),
        on_trace_ready=export)


class NullProfiler(contextlib.nullcontext):
    def step(self) -> None:
        pass
