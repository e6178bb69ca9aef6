"""What an unattended run leaves to be followed by: plain step lines and TensorBoard (rank 0).

Step lines: every ``--log-every N`` steps one line, e.g.

    epoch 3/90  batch 1200/10009 (12.0%)  step 21218  loss 4.1234  1234.5 img/s  lr 0.01  eta epoch 2:11:40  run 1d 02:03:04

printed by default whenever no progress bar is shown (stdout not a terminal, or --no-progress).
Without a bar a line also comes right after the process's first step (the run is training, at
what speed) and whenever ``LINE_SECONDS`` have passed since the last one, so a log never stays
silent for long whatever N and the epoch's length; a validation pass longer than that says how
far it got every ``LINE_SECONDS`` too (``PassProgress``).
The loss is the mean of the batch losses of the steps read back since the previous line: the
loop reads its losses back once every ``check_every`` steps (one host sync), and this module
adds no other read, so with N a multiple of ``check_every`` it is exactly the last N steps
(``read_back_every``: for N < ``check_every`` the loop reads back every N steps instead).
img/s counts all ranks (rank 0's rate x world: the ranks step in lockstep); the ETAs come from
the seconds per step since the previous line, the run's adding the last measured end-of-epoch
time (validation, checkpoint) once per epoch still to end.

TensorBoard (``--tensorboard``, the optional ``tensorboard`` package): scalars and the conv1
kernels in RUN_DIR/tensorboard, every value at its global step; a resumed run purges what a
killed run wrote after its checkpoint, so no step shows twice.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from model.kernels import conv1_kernels, kernel_grid

from .loop import LoopSettings
from .profiling import PHASES, Phases
from .report import Reporter
from .state import TrainState

DEFAULT_LOG_EVERY = 50           # steps; timm's --log-interval default (torchvision's --print-freq: 10)
LINE_SECONDS = 30.0              # without a bar: at most this long between two progress lines
TENSORBOARD_DIR = "tensorboard"  # inside the run folder
TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package, which is not installed: "
                       "pip install tensorboard (or this project's [tensorboard] extra)")


def summary_writer_class():
    """torch's SummaryWriter, imported only when asked for (tensorboard is an optional extra);
    ImportError when the package is missing."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


def read_back_every(log_every: int | None) -> int:
    """How often the loop reads its losses back (a host sync): every 10 steps, or every N steps
    for --log-every N < 10, so that no line falls between read-backs with nothing to show."""
    default = LoopSettings.check_every
    return log_every if log_every and log_every < default else default


def tensorboard_available() -> bool:
    try:
        summary_writer_class()
    except ImportError:
        return False
    return True


def duration(seconds: float) -> str:
    """H:MM:SS, or 'Nd HH:MM:SS' from a day on; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(int(round(seconds)), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}d {h:02d}:{m:02d}:{s:02d}" if days else f"{h}:{m:02d}:{s:02d}"


def steps_left(state: TrainState, epoch_batches: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(optimiser steps the run still takes, epochs it still ends) from ``state``'s position,
    every later epoch being ``epoch_batches`` long."""
    this = epoch_batches - state.batch
    total = min(this + max(epochs - state.epoch - 1, 0) * epoch_batches, state.steps_left(max_steps))
    ends = 0 if total < this else 1 + (total - this) // max(epoch_batches, 1)
    return total, ends


class RunLog:
    """A run's step lines and TensorBoard writer (both off on ranks other than 0)."""

    def __init__(self, say: Reporter, epochs: int, max_steps: int | None, world: int,
                 lines_every: int, scalars_every: int, writer=None, step: int = 0):
        self.say, self.epochs, self.max_steps, self.world = say, epochs, max_steps, world
        self.lines_every = lines_every if say.enabled else 0     # 0 = no step lines
        self.scalars_every = scalars_every if writer is not None else 0
        self.writer = writer
        self.epoch_end_seconds = 0.0     # validation + checkpoint of the last ended epoch
        self.timed = bool(self.lines_every) and not say.show_progress   # lines also by the clock
        self.last_line: float | None = None   # perf_counter of the last step line (None: none yet)
        self._phases = (step, {})        # the step and Phases.seconds at the last epoch's end (or the start)

    @classmethod
    def open(cls, cfg, say: Reporter, out: Path, world: int, is_main: bool, step: int) -> "RunLog":
        """The run's log from ``cfg`` (log_every, tensorboard, epochs, max_steps), ``step`` being
        where the run starts. Step lines by default only when no progress bar is shown."""
        every = DEFAULT_LOG_EVERY if cfg.log_every is None else cfg.log_every
        lines = every if (cfg.log_every is not None or not say.show_progress) else 0
        writer = None
        if cfg.tensorboard and is_main:
            # purge_step: a killed run may have written steps after its checkpoint; TensorBoard
            # hides every event from step+1 on that an earlier writer left in this folder
            writer = summary_writer_class()(log_dir=str(out / TENSORBOARD_DIR), purge_step=step + 1)
        return cls(say, cfg.epochs, cfg.max_steps, world, lines, every or DEFAULT_LOG_EVERY, writer, step)

    def epoch_steps(self, state: TrainState, epoch_batches: int, batch_size: int,
                    lr: Callable[[], float]) -> Callable[[TrainState], None]:
        """What to call after each step of one epoch (the run's after_step calls it; a no-op when
        there is nothing to log)."""
        if not (self.lines_every or self.scalars_every):
            return lambda st: None
        return _EpochSteps(self, state, epoch_batches, batch_size, lr)

    def epoch_ended(self, metrics: dict, step: int, seconds: float, net=None, phases: Phases | None = None) -> None:
        """After an epoch's validation and checkpoint (``seconds`` for both): its metrics line,
        the profile phases of its steps and the conv1 kernels, to TensorBoard."""
        self.epoch_end_seconds = seconds
        if self.writer is None:
            return
        for key, value in metrics.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        if phases is not None and phases.enabled:
            self._profile_scalars(phases, step)
        kernels = conv1_image(net)
        if kernels is not None:
            self.writer.add_image("conv1", kernels, step, dataformats="HWC")
        self.writer.flush()

    def _profile_scalars(self, phases: Phases, step: int) -> None:
        """This epoch's share of the Phases totals: ms per step of each phase and the data stall."""
        step0, seconds0 = self._phases
        steps = phases.split_steps(step) - phases.split_steps(step0)    # the warm-up and end-to-end window have no split
        spent = {p: phases.seconds[p] - seconds0.get(p, 0.0) for p in PHASES}
        self._phases = (step, {p: phases.seconds[p] for p in PHASES})
        total = sum(spent.values())
        if steps <= 0 or total <= 0:
            return
        self.writer.add_scalar("profile/data_stall_percent", 100 * spent["data"] / total, step)
        for p in PHASES:
            self.writer.add_scalar(f"profile/{p}_ms_per_step", 1000 * spent[p] / steps, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def validated(say: Reporter, view: str, images: int, seconds: float) -> None:
    """One line per validation pass (``images``: all ranks') when no progress bar showed it."""
    if not say.show_progress:
        rate = images / seconds if seconds > 0 else 0.0
        say.line(f"  val {view}: {images} images in {seconds:.1f} s ({rate:.1f} img/s)")


class PassProgress:
    """Plain progress of one validation pass when no bar shows it: every ``LINE_SECONDS`` a line
    with the images done (this rank's share), the rate and the time left; a pass shorter than
    that prints only ``validated``'s summary line. Call with the images of each batch."""

    def __init__(self, say: Reporter, view: str, total: int):
        self.say, self.view, self.total, self.done = say, view, total, 0
        self.on = say.enabled and not say.show_progress
        self.start = self.last = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.on or now - self.last < LINE_SECONDS:
            return
        self.last = now
        rate = self.done / (now - self.start) if now > self.start else 0.0
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        self.say.line(f"  val {self.view}: {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f}%)"
                      f"  {rate:.1f} img/s  eta {duration(left)}")


def conv1_image(net):
    """The conv1 kernels as tools.figures draws them (uint8 HWC), or None for a net without
    AlexNet's towers."""
    if net is None or not hasattr(net, "towers"):
        return None
    return kernel_grid(conv1_kernels(net))


class _EpochSteps:
    """Step lines and step scalars of one epoch. Reads only host numbers ``train_steps``
    already has: ``state.sums`` changes exactly when the loop has read its pending losses back,
    and then holds every step up to ``state.read_step`` (on a GPU up to a span behind)."""

    def __init__(self, log: RunLog, state: TrainState, epoch_batches: int, batch_size: int,
                 lr: Callable[[], float]):
        self.log, self.epoch_batches, self.batch_size, self.lr = log, epoch_batches, batch_size, lr
        self.mark = (state.step, state.read_step, state.sums.loss, time.perf_counter())

    def __call__(self, state: TrainState) -> None:
        log, now = self.log, time.perf_counter()
        line = log.lines_every and (state.step % log.lines_every == 0 or (log.timed and (
            log.last_line is None or now - log.last_line >= LINE_SECONDS)))
        scalars = log.scalars_every and state.step % log.scalars_every == 0
        if not (line or scalars):
            return
        step0, read0, loss0, t0 = self.mark
        self.mark = (state.step, state.read_step, state.sums.loss, now)
        read = state.read_step - read0
        loss = (state.sums.loss - loss0) / read if read else math.nan
        per_step = (now - t0) / max(state.step - step0, 1)
        rate = self.batch_size * log.world / per_step if per_step > 0 else 0.0
        lr = self.lr()
        if line:
            log.say.line(self.line(state, loss, rate, lr, per_step))
            log.last_line = now
        if scalars:
            if read:
                log.writer.add_scalar("step/loss", loss, state.step)
            log.writer.add_scalar("step/lr", lr, state.step)
            log.writer.add_scalar("step/images_per_s", rate, state.step)

    def line(self, state: TrainState, loss: float, rate: float, lr: float, per_step: float) -> str:
        log, n = self.log, self.epoch_batches
        left, ends = steps_left(state, n, log.epochs, log.max_steps)
        eta_epoch = (n - state.batch) * per_step
        eta_run = left * per_step + ends * log.epoch_end_seconds
        width = len(str(n))
        per_rank = f" ({rate / log.world:.1f}/rank)" if log.world > 1 else ""
        return (f"epoch {state.epoch + 1}/{log.epochs}  batch {state.batch:>{width}}/{n} "
                f"({100 * state.batch / max(n, 1):5.1f}%)  step {state.step}  "
                f"loss {'-' if math.isnan(loss) else f'{loss:.4f}'}  {rate:.1f} img/s{per_rank}  lr {lr:.3g}  "
                f"eta epoch {duration(eta_epoch)}  run {duration(eta_run)}")
