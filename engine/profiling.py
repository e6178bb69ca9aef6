"""Where a training step's time goes: data wait, host→device, forward, backward, optimiser.

``Phases`` is used by the training loop on every step. Off (the default) it is a no-op
context manager. With ``--profile`` it synchronises the model's CUDA devices at each phase
boundary (otherwise a phase's GPU work would be billed to whichever later phase happens to
block) and wraps each phase in an NVTX range (``torch.cuda.nvtx``) so Nsight Systems shows
the same names, plus a ``torch.profiler`` ``record_function`` label for the Chrome trace.
The data stall is the data-wait share of the step time: the time the model sat idle
waiting for the loader.

The steps this process runs fall into windows, by their place after its first step:

    [warm-up W][end-to-end E][per-phase split ...]      W = --profile-warmup, E = --profile-window

The warm-up (cold loader, cuDNN's algorithm search, the allocator growing) counts in no rate.
The end-to-end window runs the loop exactly as an unprofiled run does (no phase syncs); it is
timed by the wall clock between two syncs, so its rate is what training delivers. Every later
step is split by phase, with the syncs that take. The first batch after the warm-up is kept
(a clone on the device) for the in-loop model rate (``engine.loop.model_rate``): the same
step on that batch, no loader, which is what end-to-end is read against
(stall = 1 − end-to-end ÷ model). A run too short to reach a window reports it as not measured.
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
    def __init__(self, enabled: bool, devices: list[str], warmup: int = 0, window: int = 0):
        self.enabled = enabled
        self.cuda = [torch.device(d) for d in devices if d.startswith("cuda")]
        self.warmup, self.window = warmup, window
        self.seconds: dict[str, float] = defaultdict(float)
        self.images = 0
        self.first: int | None = None            # the global step before this process's first step
        self.split = False                       # whether the current step is split by phase
        self.e2e_images, self.e2e_seconds, self._e2e_start = 0, 0.0, None
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None   # kept for the in-loop model rate

    def _sync(self) -> None:
        sync(self.cuda)

    def _index(self, step: int) -> int:
        """The 0-based place among this process's steps of the step that makes the count ``step + 1``."""
        if self.first is None:
            self.first = step
        return step - self.first

    def start_step(self, step: int) -> None:
        """Before the step after global step ``step`` (the loop's ``state.step``) starts."""
        if not self.enabled:
            return
        i = self._index(step)
        self.split = i >= self.warmup + self.window
        if i == self.warmup and self.window:      # the end-to-end window opens
            self._sync()
            self._e2e_start = time.perf_counter()

    def end_step(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        """After that step is done (``step``: the count now; ``images``/``labels``: its device batch)."""
        if not self.enabled:
            return
        i = self._index(step - 1)
        if i == self.warmup:                     # the first step after the warm-up: keep its batch
            self.batch = (images.detach().clone(), labels.clone())
        if self.split:
            self.images += labels.shape[0]
        elif self._e2e_start is not None:
            self.e2e_images += labels.shape[0]
            if i == self.warmup + self.window - 1:
                self.close_window()

    def close_window(self) -> None:
        """End the end-to-end window (at its last step, or where the run ends inside it)."""
        if self._e2e_start is not None:
            self._sync()
            self.e2e_seconds = time.perf_counter() - self._e2e_start
            self._e2e_start = None

    def split_steps(self, step: int) -> int:
        """How many steps up to global step ``step`` were split by phase."""
        if self.first is None:
            return 0
        return max(0, step - self.first - self.warmup - self.window)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not (self.enabled and self.split):
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

    def summary(self, step: int, model: dict | None = None) -> dict:
        """The run's figures up to global step ``step``: per-phase ms/step and share of the step,
        images/s and data-stall % (from the phases alone) over the split steps; the warm-up
        dropped; the end-to-end rate; ``model`` (``engine.loop.model_rate``'s result) and the
        stall read from the two. A rate whose window the run did not reach is None."""
        self.close_window()
        steps = self.split_steps(step)
        done = step - self.first if self.first is not None else 0
        total = sum(self.seconds[p] for p in PHASES)
        per = max(steps, 1)
        phases = {p: {"ms_per_step": 1000 * self.seconds[p] / per,
                      "percent": 100 * self.seconds[p] / total if total else 0.0} for p in PHASES}
        e2e = self.e2e_images / self.e2e_seconds if self.e2e_seconds else None
        model_rate = (model or {}).get("images_per_s")
        return {"steps": steps, "images": self.images,
                "step_ms": 1000 * total / per,
                "images_per_s": self.images / total if total else 0.0,
                "data_stall_percent": phases["data"]["percent"], "phases": phases,
                "warmup_steps": min(self.warmup, done),
                "end_to_end_steps": min(self.window, max(0, done - self.warmup)),
                "end_to_end_images_per_s": e2e,
                "model_steps": (model or {}).get("steps", 0),
                "model_images_per_s": model_rate,
                "stall_percent": 100 * (1 - e2e / model_rate) if e2e and model_rate else None}


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
