"""The one timing harness of the benches: interleaved repeats on one wall clock and one CPU clock.

    from common.timing import interleaved
    samples = interleaved({"ours": run_ours, "reference": run_ref}, repeats=5, devices=["cuda:0"])
    rate = statistics.median(s.rate for s in samples["ours"])     # items per wall second

Each contender is a callable that does the work to time and returns how many items (images)
it processed. Round after round every contender runs once, so drift on a shared machine
(other jobs, clock boosts, a warming cache) hits all of them alike instead of whichever ran
last; medians over rounds are reported. ``prepare(name)`` runs untimed before each turn
(warm-up batches, waiting for the others' prefetching to settle).

Clocks (do not mix others in, or two benches' numbers stop being comparable):
  wall: time.perf_counter, with the CUDA devices synchronised at both ends of the span;
  CPU:  time.process_time (every thread of this process) + the user+system time of child
        processes reaped during the span (os.times), so a worker pool that ended inside
        the span is billed to it; children still running (a DataLoader's workers) are not.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping


@dataclass(frozen=True)
class Sample:
    """One timed turn: ``items`` processed in ``wall`` seconds, burning ``cpu`` CPU seconds."""
    items: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        """Items per wall-clock second."""
        return self.items / self.wall

    @property
    def cpu_ms_per_item(self) -> float:
        return 1e3 * self.cpu / self.items


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its reaped children."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def timed(run: Callable[[], int], devices: Iterable = ()) -> Sample:
    """Time one call of ``run`` (it returns the items it processed)."""
    devices = list(devices)
    if devices:
        from common.devices import sync   # torch only where a device is named (prep has none)
        sync(devices)
    wall, cpu = time.perf_counter(), cpu_seconds()
    items = run()
    if devices:
        sync(devices)
    return Sample(items, time.perf_counter() - wall, cpu_seconds() - cpu)


def interleaved(runs: Mapping[str, Callable[[], int]], repeats: int, *, devices: Iterable = (),
                prepare: Callable[[str], None] | None = None, alternate: bool = False,
                on_turn: Callable[[int, str], None] | None = None) -> dict[str, list[Sample]]:
    """``repeats`` rounds, every contender timed once per round, in the mapping's order (in
    reverse every other round with ``alternate``: no contender always follows the same one).
    ``on_turn(round, name)`` is called before each turn (a progress bar's description)."""
    devices = list(devices)
    samples: dict[str, list[Sample]] = {name: [] for name in runs}
    for r in range(repeats):
        order = list(runs)[::-1] if alternate and r % 2 else list(runs)
        for name in order:
            if on_turn is not None:
                on_turn(r, name)
            if prepare is not None:
                prepare(name)
            samples[name].append(timed(runs[name], devices))
    return samples
