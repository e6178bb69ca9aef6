"""TrainState: where a run is, in one object; its state_dict() is the checkpoint's training part.

Everything a bitwise-exact continuation needs besides the model and optimiser tensors lives
here: completed epochs, the global optimiser step, the position inside the current epoch
(batches done), that epoch's running sums, the per-epoch history (the metrics.jsonl lines),
the lr schedule, every rank's RNG states and what the epoch's data order depends on (seed,
per-replica batch size, number of ranks). ``step`` is the run's one step counter: the lr
warm-up, logging, profiling, stop polling and --max-steps all read it, and ``count_step`` is
the only place it moves.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .schedule import PlateauSchedule

# The checkpoint keys a resume cannot do without (besides "model", "optimizer", "config").
KEYS = ("epoch", "step", "batch", "sums", "history", "schedule", "seed", "batch_size", "world", "rng")


@dataclass
class EpochSums:
    """Running sums of one training epoch (host numbers), so a resumed epoch reports all of it."""
    images: int = 0          # this rank's images
    loss: float = 0.0        # sum over batches of the batch-mean loss
    top1: int = 0            # correct counts
    top5: int = 0
    seconds: float = 0.0     # wall time spent in steps (data wait included)
    amp_skipped: int = 0     # fp16 steps whose update the gradient scaler skipped (inf/nan gradients)

    def metrics(self, batches: int) -> dict:
        n = max(self.images, 1)
        return {"train_loss": self.loss / max(batches, 1),
                "train_top1_err": 1 - self.top1 / n, "train_top5_err": 1 - self.top5 / n,
                "images_per_s": self.images / self.seconds if self.seconds else 0.0,
                "amp_skipped": self.amp_skipped}


@dataclass
class TrainState:
    schedule: PlateauSchedule
    seed: int                # with the epoch number, fixes epoch e's data order and augmentation (the Loader)
    batch_size: int          # per replica; with world, what ``batch`` counts in
    world: int               # number of ranks (replicas)
    epoch: int = 0           # completed epochs
    step: int = 0            # optimiser steps done, all epochs
    batch: int = 0           # optimiser steps done inside the current epoch (where its loader resumes)
    sums: EpochSums = field(default_factory=EpochSums)
    history: list[dict] = field(default_factory=list)   # one metrics dict per completed epoch
    rng: list[dict] = field(default_factory=list)       # every rank's RNG states, captured at save time
    # what the run reads: {"train": records in the train split, "classes": digest of meta.json's
    # class list}; None in checkpoints that predate it. A resume compares it (engine.resume)
    records: dict | None = None
    # the global step up to which ``sums`` hold the losses: the loop reads them back up to a
    # span behind the device (engine.loop.settle); not saved, as a checkpoint follows a full
    # read-back (then it equals ``step``)
    read_step: int = 0

    def count_step(self) -> None:
        """One optimiser step done: the only writer of ``step`` and ``batch``."""
        self.step += 1
        self.batch += 1

    def steps_left(self, max_steps: int | None) -> float:
        """Optimiser steps --max-steps still allows (inf without one); 0 once it is reached."""
        return math.inf if max_steps is None else max(max_steps - self.step, 0)

    def max_steps_reached(self, max_steps: int | None) -> bool:
        return self.steps_left(max_steps) == 0

    def continue_as(self, seed: int, batch_size: int, world: int) -> tuple[int, int, int] | None:
        """A resumed run goes on with this data layout. Mid-epoch only the saved one will do: the
        epoch's first ``batch`` steps were batches of the saved size and data order, and another
        size, rank count or seed would replay a different set of images; then nothing changes
        and the saved (seed, batch_size, world) is returned for the caller's error line."""
        then = (self.seed, self.batch_size, self.world)
        if self.batch and then != (seed, batch_size, world):
            return then
        self.seed, self.batch_size, self.world = seed, batch_size, world
        return None

    def end_epoch(self, metrics: dict) -> None:
        self.history.append(metrics)
        self.epoch, self.batch, self.sums = self.epoch + 1, 0, EpochSums()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch": self.batch, "sums": asdict(self.sums),
                "history": list(self.history), "schedule": self.schedule.state_dict(), "seed": self.seed,
                "batch_size": self.batch_size, "world": self.world, "rng": self.rng, "records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step, self.batch = int(state["epoch"]), int(state["step"]), int(state["batch"])
        self.read_step = self.step
        self.sums = EpochSums(**state["sums"])
        self.history = list(state["history"])
        self.seed, self.batch_size, self.world = int(state["seed"]), int(state["batch_size"]), int(state["world"])
        self.rng = list(state["rng"])
        self.records = state.get("records")
