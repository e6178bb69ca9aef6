"""The paper's learning-rate schedule: divide by 10 when validation error stops improving.

"The heuristic which we followed was to divide the learning rate by 10 when the validation
error rate stopped improving with the current learning rate" (Krizhevsky et al. 2012, §5);
they did it three times in ~90 epochs. Here "stopped improving" is made mechanical, like
``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold_mode="abs")``: after
``patience`` consecutive epochs whose validation top-1 error (a fraction, 0-1) does not beat
the best so far by more than ``threshold``, the lr is divided by ``factor`` and the count
restarts; after ``max_drops`` divisions (the paper: three) the lr stays where it is. Our own
small class so its state is plain numbers (checkpoints load with
``weights_only=True``) and the rule reads in one screen. The schedule only decides the lr;
the step loop writes it into the optimizer before every step (``engine.loop.train_steps``,
through ``lr_at``, which adds the optional linear warm-up).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class PlateauSchedule:
    lr: float                 # the current learning rate ε
    patience: int = 4         # epochs without improvement before a drop
    threshold: float = 0.001  # required improvement of the top-1 error (absolute, fraction)
    factor: float = 10.0      # the paper divides by 10
    max_drops: int = 3        # the paper divided three times in ~90 epochs; no more divisions after these
    best: float = math.inf    # best validation top-1 error seen (fraction)
    bad_epochs: int = 0       # consecutive epochs without improvement since best or the last drop
    drops: int = 0            # how many times lr was divided so far

    def step(self, val_error: float) -> bool:
        """Record one epoch's validation top-1 error; True if the lr was divided now."""
        if val_error < self.best - self.threshold:
            self.best, self.bad_epochs = val_error, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs < self.patience or self.drops >= self.max_drops:
            return False
        self.lr /= self.factor
        self.bad_epochs, self.drops = 0, self.drops + 1
        return True

    def retune(self, patience: int, threshold: float, max_drops: int, lr: float | None = None) -> None:
        """A resumed run's rule: its flags' patience, threshold and drop limit, the progress
        (best, bad epochs, drops) kept; ``lr`` replaces the current one (an explicit --lr: the
        paper's drops were decisions by hand, and a hand-given lr always wins)."""
        self.patience, self.threshold, self.max_drops = patience, threshold, max_drops
        if lr is not None:
            self.lr = lr

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def lr_at(lr: float, done: int, warmup_steps: int) -> float:
    """The lr for the step after ``done`` global steps: ``lr`` scaled by the linear warm-up
    (1/warmup_steps, 2/warmup_steps, ... 1) while it lasts. A fixed function of the step
    count, so a resumed run gets exactly the lrs of an uninterrupted one."""
    return lr * min(1.0, (done + 1) / warmup_steps) if warmup_steps else lr
