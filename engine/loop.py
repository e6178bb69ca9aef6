"""The training step loop and one evaluation pass.

Pixels arrive from the loader on the 0–255 scale minus the mean (not divided by std), NCHW
float: the paper's input, which its N(0, 0.01²) initialisation assumes. Nothing here knows
about DALI, run folders or signals: ``train_steps`` takes any iterator of batches, a
``TrainState`` it advances, and ``StepHooks`` (how a batch reaches the device, the numeric
precision of forward/backward/update, the stop check, progress), so tests drive it with
plain tensors.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from prep.records import RecordsError

from .profiling import Phases, NullProfiler
from .recipe import loss_fn
from .schedule import lr_at
from .state import EpochSums, TrainState
from .voting import topk_counts, vote


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; ``step`` is the global optimiser step that produced it."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step


@dataclass(frozen=True)
class LoopSettings:
    input_device: torch.device              # where tower 0 (and so the input) lives
    amp: str = "none"                       # "bf16" or "none"
    channels_last: bool = False
    check_every: int = 10                   # losses are read back (one host sync) every this many steps


@dataclass(frozen=True)
class StepPlan:
    """Where ``train_steps`` stops on its own: the end of the epoch or the run's step budget."""
    epoch_batches: int                      # batches in this epoch (the loader's, capped by --epoch-steps)
    max_steps: int | None = None            # global steps of the whole run (--max-steps)
    warmup_steps: int = 0


class Precision:
    """The numeric format of forward, backward and update. bf16 needs no loss scaling; an fp16
    GradScaler plugs in here (``backward`` scales the loss, ``step`` unscales, skips inf steps
    and updates the scale) without touching the loop."""

    def __init__(self, amp: str, device: torch.device):
        self.amp, self.device = amp, device

    def autocast(self):
        if self.amp != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()


def to_device(batch, settings: LoopSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a loader batch to the input device (a no-op when DALI already produced it there)."""
    images, labels = batch
    images = images.to(settings.input_device, non_blocking=True)
    labels = labels.to(settings.input_device, non_blocking=True)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


@dataclass(frozen=True)
class StepHooks:
    """What a caller plugs into ``train_steps``; everything but ``prepare`` and ``precision``
    defaults to doing nothing."""
    prepare: Callable[[object], tuple[torch.Tensor, torch.Tensor]]   # loader batch -> (images, labels) on the device
    precision: Precision
    phases: Phases = field(default_factory=lambda: Phases(False, []))  # per-phase timers (--profile)
    should_stop: Callable[[], bool] = lambda: False                   # asked after every step (signals)
    on_step: Callable[[TrainState], None] = lambda state: None        # progress bar, periodic log lines
    profiler: object = field(default_factory=NullProfiler)           # a torch.profiler.profile to .step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, precision: Precision, phases: Phases):
    """Forward, backward, update. Returns (loss, (top-1, top-5) correct) as device tensors."""
    with phases("forward"), precision.autocast():
        logits = model(images)
        loss = loss_fn(logits, labels)
    with phases("backward"):
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
    with phases("optimizer"):
        precision.step(optimizer)
    with torch.no_grad():
        correct = topk_counts(logits.detach(), labels)
    return loss.detach(), correct


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator,
                state: TrainState, plan: StepPlan, settings: LoopSettings, hooks: StepHooks) -> str:
    """Train from ``state``'s position until the epoch ends ("epoch_end"), the run's step budget
    is spent ("max_steps") or ``hooks.should_stop()`` ("stopped"). ``state`` is advanced in place;
    on return its sums hold every step done. NaN/inf loss raises NonFiniteLoss (losses are read
    back every ``settings.check_every`` global steps and before returning); a bad record met by
    the loader raises its RecordsError after the sums are brought up to date."""
    model.train()
    pending = _Pending(first_step=state.step + 1)
    reason = "epoch_end"
    while state.batch < plan.epoch_batches:
        if plan.max_steps is not None and state.step >= plan.max_steps:
            reason = "max_steps"
            break
        set_lr(optimizer, lr_at(state.schedule.lr, state.step, plan.warmup_steps))
        start = time.perf_counter()
        with hooks.phases("data"):
            batch = next_batch(batches, pending, state)
        if batch is None:                    # the loader ran out before the planned count
            break
        with hooks.phases("h2d"):
            images, labels = hooks.prepare(batch)
        loss, correct = train_step(model, optimizer, images, labels, hooks.precision, hooks.phases)
        state.count_step()
        pending.add(loss, correct, labels.shape[0])
        if state.step % settings.check_every == 0:
            pending.flush_into(state.sums)
        state.sums.seconds += time.perf_counter() - start
        hooks.phases.count(labels.shape[0])
        hooks.profiler.step()
        hooks.on_step(state)
        if hooks.should_stop():
            reason = "stopped"
            break
    pending.flush_into(state.sums)
    return reason


def next_batch(batches: Iterator, pending: "_Pending", state: TrainState):
    """The next batch, or None at the end; a bad record first settles the sums (the caller saves)."""
    try:
        return next(batches, None)
    except RecordsError:
        pending.flush_into(state.sums)
        raise


@dataclass
class _Pending:
    """Per-step device tensors not yet read back to the host (reading forces a sync)."""
    first_step: int                     # global step number of the first pending loss
    losses: list = field(default_factory=list)
    correct: list = field(default_factory=list)
    images: int = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        self.losses.append(loss), self.correct.append(correct)
        self.images += images

    def flush_into(self, sums: EpochSums) -> None:
        """Read the losses back, raise NonFiniteLoss at the first bad one, add them to ``sums``."""
        if not self.losses:
            return
        losses = torch.stack(self.losses).float().cpu().tolist()
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise NonFiniteLoss(self.first_step + i, value)
        correct = torch.stack(self.correct).sum(0).cpu().tolist()
        sums.loss += sum(losses)
        sums.top1 += int(correct[0])
        sums.top5 += int(correct[1])
        sums.images += self.images
        self.first_step += len(losses)
        self.losses, self.correct, self.images = [], [], 0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, settings: LoopSettings,
             on_batch: Callable[[int], None] = lambda n: None) -> dict:
    """Top-1/top-5 correct counts over ``batches``; 10-crop batches (B, 10, 3, H, W) are voted.

    Returns {"images", "top1", "top5", "loss_sum"} (sums, so ranks can add them up).
    """
    model.eval()
    precision = Precision(settings.amp, settings.input_device)
    # images, top-1, top-5, summed NLL; kept on the input device and read back once at the
    # end, so a GPU evaluation never waits for the device between batches
    totals = torch.zeros(4, dtype=torch.float64, device=settings.input_device)
    for images, labels in batches:
        images, labels = to_device((images.flatten(0, 1) if images.ndim == 5 else images, labels), settings)
        views = images.shape[0] // labels.shape[0]
        with precision.autocast():
            logits = model(images).float()
        if views > 1:
            probs = vote(logits.view(labels.shape[0], views, -1))
        else:
            probs = torch.softmax(logits, dim=1)
        nll = nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        counts = topk_counts(probs, labels)
        totals[:3] += torch.cat([counts.new_tensor([labels.shape[0]]), counts]).double()
        totals[3] += nll.double()
        on_batch(labels.shape[0])
    model.train()
    return dict(zip(("images", "top1", "top5", "loss_sum"), totals.tolist()))


def eval_metrics(sums: dict) -> dict:
    """Error rates (fractions) and mean loss from summed counts (after adding up the ranks)."""
    n = max(sums["images"], 1)
    return {"images": int(sums["images"]), "top1_err": 1 - sums["top1"] / n,
            "top5_err": 1 - sums["top5"] / n, "loss": sums["loss_sum"] / n}
