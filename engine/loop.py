"""The training step loop and one evaluation pass.

Pixels arrive from the loader on the 0–255 scale minus the mean (not divided by std), NCHW
float: the paper's input, which its N(0, 0.01²) initialisation assumes. Nothing here knows
about DALI, run folders or signals: ``train_steps`` takes any iterator of batches, a
``TrainState`` it advances, and ``StepHooks`` (the numeric precision of forward/backward/update,
the phase timers, what runs after each step, the ranks' agreement), so tests drive it with
plain tensors.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pipeline.finish import U8Batch, finish
from records.format import RecordsError

from .precision import DTYPES, Precision
from .profiling import Phases
from .recipe import loss_fn
from .schedule import lr_at
from .state import EpochSums, TrainState
from .voting import topk_counts, vote


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; ``step`` is the global optimiser step that produced it (on
    another rank: the last step of the checked span, ``value`` None)."""

    def __init__(self, step: int, value: float | None):
        super().__init__(f"loss became {value} at step {step}" if value is not None
                         else f"loss became NaN/inf on another rank by step {step}")
        self.step = step


# What a rank tells the others (the maximum over ranks wins): the status codes of ``StepHooks.agree``.
OK, END, BAD_RECORD, NONFINITE = 0, 1, 2, 3


@dataclass(frozen=True)
class LoopSettings:
    input_device: torch.device              # where tower 0 (and so the input) lives
    amp: str = "none"                       # "none", "bf16" or "fp16" (engine.precision.AMPS)
    channels_last: bool = False
    check_every: int = 10                   # losses are read back (one host sync) every this many steps


@dataclass(frozen=True)
class StepPlan:
    """Where ``train_steps`` stops on its own: the end of the epoch or the run's step budget."""
    epoch_batches: int                      # batches in this epoch (the loader's, capped by --epoch-steps)
    max_steps: int | None = None            # global steps of the whole run (--max-steps)
    warmup_steps: int = 0


def to_device(batch, settings: LoopSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a loader batch to the input device (a no-op when DALI already produced it there).
    A uint8 batch (``U8Batch``) is finished there by ``finish_u8``."""
    images, labels = batch
    if isinstance(images, U8Batch):
        return finish_u8(batch, settings)
    images = images.to(settings.input_device, non_blocking=True)
    labels = labels.to(settings.input_device, non_blocking=True)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def finish_u8(batch, settings: LoopSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(U8Batch, labels) -> the float input on the input device: the uint8 pixels cross to the
    device (1 byte per value instead of 4), then ``pipeline.finish`` subtracts the mean there,
    in float32, bit-for-bit the float view, rounded once to the autocast dtype under bf16/fp16
    (what autocast's cast of the float view gives, without a float32 batch written and read
    again). channels_last: the NCHW view of the NHWC result, which is already the
    channels_last layout, so no copy follows.

    From a CPU loader to a GPU the pixels are first copied into page-locked memory (one host
    copy per batch, ~19 MB at batch 128) so the host->device copy is asynchronous and overlaps
    the previous step's kernels; a pageable source would block the host for the transfer."""
    u8, labels = batch
    device = settings.input_device
    if device.type == "cuda" and u8.pixels.device.type == "cpu":
        u8 = replace(u8, pixels=u8.pixels.pin_memory())
    images = finish(u8, device, DTYPES.get(settings.amp, torch.float32), channels_last=settings.channels_last)
    return images, labels.to(device, non_blocking=True)


@dataclass(frozen=True)
class StepHooks:
    """What a caller plugs into ``train_steps``; everything but ``precision`` defaults to doing nothing."""
    precision: Precision
    phases: Phases = field(default_factory=lambda: Phases(False, []))  # per-phase timers (--profile)
    # after every step, given the state: progress, log lines, the profiler; True asks the
    # loop to stop after this step (a signal)
    after_step: Callable[[TrainState], bool] = lambda state: False
    # the largest status code over all ranks (a host-side collective; identity in one process):
    # every rank must leave the loop after the same step, or the next collective hangs
    agree: Callable[[int], int] = lambda status: status


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, precision: Precision, phases: Phases):
    """Forward, backward, update. Returns (loss, (top-1, top-5) correct, skipped) as device
    tensors; ``skipped`` is True when the fp16 scaler skipped the update (inf/nan gradients)."""
    with phases("forward"), precision.autocast():
        logits = model(images)
        loss = loss_fn(logits, labels)
    with phases("backward"):
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
    with phases("optimizer"):
        skipped = precision.step(optimizer)
    with torch.no_grad():
        correct = topk_counts(logits.detach(), labels)
    return loss.detach(), correct, skipped


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator,
                state: TrainState, plan: StepPlan, settings: LoopSettings, hooks: StepHooks) -> str:
    """Train from ``state``'s position until the epoch ends ("epoch_end"), the run's step budget
    is spent ("max_steps") or ``hooks.after_step`` asks to stop ("stopped"). ``state`` is
    advanced in place; on return its sums hold every step done. NaN/inf loss raises
    NonFiniteLoss; a bad record met by the loader raises its RecordsError after the sums are
    brought up to date. Under several ranks both are agreed on (``hooks.agree``), so every rank
    raises after the same step.

    Host synchronisation (the host waits for the device's queued work) happens only in
    ``settle``: every ``settings.check_every`` steps and on return, the losses, correct counts
    and fp16 skip flags are read back, one read for the whole span. Nothing else here reads a
    device value: the skip flag stays a device tensor, ``state.sums`` holds host numbers only
    (so ``hooks.after_step``'s progress costs no sync), and the loader's batch and the data
    status agreed per step are host facts (``hooks.agree`` is a host-side collective, not a
    device one). The run's stop poll (``engine.run.stop_poll``) all-reduces the stop flag every
    ``check_every`` steps in distributed runs. A fp16 GradScaler.step itself reads its inf
    flag (torch's, per step) unless the optimiser can skip on the device."""
    model.train()
    pending, reason = _Pending(), "epoch_end"
    while state.batch < plan.epoch_batches:
        if state.max_steps_reached(plan.max_steps):
            reason = "max_steps"
            break
        set_lr(optimizer, lr_at(state.schedule.lr, state.step, plan.warmup_steps))
        start = time.perf_counter()
        batch = fetch_batch(batches, state, pending, hooks)
        if batch is None:                    # the loader ran out before the planned count
            break
        with hooks.phases("h2d"):
            images, labels = to_device(batch, settings)
        loss, correct, skipped = train_step(model, optimizer, images, labels, hooks.precision, hooks.phases)
        state.count_step()
        pending.add(loss, correct, skipped if hooks.precision.scaler is not None else None, labels.shape[0])
        if state.step % settings.check_every == 0:
            settle(pending, state, hooks)
        state.sums.seconds += time.perf_counter() - start
        hooks.phases.add_images(labels.shape[0])
        if hooks.after_step(state):
            reason = "stopped"
            break
    settle(pending, state, hooks)
    return reason


def fetch_batch(batches: Iterator, state: TrainState, pending: "_Pending", hooks: StepHooks):
    """The next batch, or None when the loader ran out on any rank. Every rank must run this
    step or none: DDP's backward is a collective, so a rank without a batch (bad record, loader
    ran out) would leave the others waiting forever. A bad record on any rank raises (its
    RecordsError on the rank that met it) after the steps before it are read back: the caller
    saves them."""
    with hooks.phases("data"):
        batch, failure = next_batch(batches)
    status = hooks.agree(OK if batch is not None else BAD_RECORD if failure is not None else END)
    if status == END:
        return None
    if status == BAD_RECORD:
        settle(pending, state, hooks)
        raise failure or RecordsError(f"another rank met a bad record at step {state.step + 1} "
                                      "(its own error line names it)")
    return batch


def next_batch(batches: Iterator):
    """(the next batch, None), (None, None) at the end, or (None, the RecordsError) when the
    loader met a bad record (the loader is unusable afterwards: nothing more is fetched)."""
    try:
        return next(batches, None), None
    except RecordsError as exc:
        return None, exc


def settle(pending: "_Pending", state: TrainState, hooks: StepHooks) -> None:
    """Read the pending steps back into ``state.sums`` (the one host sync), then agree with the
    other ranks: a NaN/inf loss on any rank raises NonFiniteLoss on all of them."""
    bad = pending.flush_into(state.sums, state.step)
    if hooks.agree(NONFINITE if bad is not None else OK) == NONFINITE:
        raise NonFiniteLoss(*(bad or (state.step, None)))


@dataclass
class _Pending:
    """Per-step device tensors not yet read back to the host (reading forces a sync): the
    losses of the steps up to the state's current one."""
    losses: list = field(default_factory=list)
    correct: list = field(default_factory=list)
    skipped: list = field(default_factory=list)   # fp16 only: 0-dim bool, True = update skipped
    images: int = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, skipped: torch.Tensor | None, images: int) -> None:
        self.losses.append(loss), self.correct.append(correct)
        if skipped is not None:
            self.skipped.append(skipped)
        self.images += images

    def flush_into(self, sums: EpochSums, step: int) -> tuple[int, float] | None:
        """Read the losses back and add them to ``sums``, ``step`` being the global step of the
        last one; (step, value) of the first NaN/inf loss instead (nothing added). A skipped
        fp16 step is the scaler's business, not a stop."""
        if not self.losses:
            return None
        losses = torch.stack(self.losses).float().cpu().tolist()
        first = step - len(losses) + 1
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                return first + i, value
        correct = torch.stack(self.correct).sum(0).cpu().tolist()
        if self.skipped:
            sums.amp_skipped += int(torch.stack(self.skipped).sum().cpu())
        sums.loss += sum(losses)
        sums.top1 += int(correct[0])
        sums.top5 += int(correct[1])
        sums.images += self.images
        self.losses, self.correct, self.skipped, self.images = [], [], [], 0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, settings: LoopSettings,
             on_batch: Callable[[int], None] = lambda n: None) -> dict:
    """Top-1/top-5 correct counts over ``batches``; 10-crop batches (B, 10, 3, H, W) are voted.

    Returns {"images", "top1", "top5", "loss_sum"} (sums, so ranks can add them up).
    """
    model.eval()
    precision = Precision(settings.amp, settings.input_device.type)
    # images, top-1, top-5, summed NLL; kept on the input device and read back once at the
    # end, so a GPU evaluation never waits for the device between batches
    totals = torch.zeros(4, dtype=torch.float64, device=settings.input_device)
    for images, labels in batches:
        if not isinstance(images, U8Batch) and images.ndim == 5:     # 10 crops: one batch of B x 10
            images = images.flatten(0, 1)
        images, labels = to_device((images, labels), settings)
        if images.ndim == 5:                 # finished uint8 crops (channels_last per crop stays so)
            images = images.flatten(0, 1)
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
