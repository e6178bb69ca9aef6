"""One training epoch and one evaluation pass, in small pieces.

Pixels arrive from the loader on the 0–255 scale minus the mean (not divided by std), NCHW
float: the paper's input, which its N(0, 0.01²) initialisation assumes. Nothing here knows
about DALI, run folders or signals: ``train_one_epoch`` takes any iterator of
``(images, labels)`` and optional ``StepHooks`` (stop check, progress, profiling), so tests
drive it with plain tensors.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .profiling import Phases
from .recipe import loss_fn
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


@dataclass
class EpochSums:
    """Running sums of one training epoch; checkpointed mid-epoch so a resume reports the whole epoch."""
    batches: int = 0
    images: int = 0
    loss: float = 0.0        # sum over batches of the batch-mean loss
    top1: int = 0            # correct counts
    top5: int = 0
    seconds: float = 0.0     # wall time spent in steps (data wait included)

    def as_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict:
        n = max(self.images, 1)
        return {"train_loss": self.loss / max(self.batches, 1),
                "train_top1_err": 1 - self.top1 / n, "train_top5_err": 1 - self.top5 / n,
                "images_per_s": self.images / self.seconds if self.seconds else 0.0}


@dataclass
class _Pending:
    """Per-step device tensors not yet read back to the host (reading forces a sync)."""
    losses: list = field(default_factory=list)
    correct: list = field(default_factory=list)
    images: int = 0


def autocast(settings: LoopSettings):
    if settings.amp != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.input_device.type, dtype=torch.bfloat16)


def to_device(images: torch.Tensor, labels: torch.Tensor, settings: LoopSettings):
    """Move a batch to the input device (a no-op when DALI already produced it there)."""
    images = images.to(settings.input_device, non_blocking=True)
    labels = labels.to(settings.input_device, non_blocking=True)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, settings: LoopSettings, phases: Phases):
    """Forward, backward, update. Returns (loss, (top-1, top-5) correct) as device tensors."""
    with phases("forward"), autocast(settings):
        logits = model(images)
        loss = loss_fn(logits, labels)
    with phases("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phases("optimizer"):
        optimizer.step()
    with torch.no_grad():
        correct = topk_counts(logits.detach(), labels)
    return loss.detach(), correct


def flush(pending: _Pending, sums: EpochSums, first_step: int) -> None:
    """Read the pending losses back, raise NonFiniteLoss at the first bad one, add them to sums.

    ``first_step`` is the global step number of the first pending loss.
    """
    if not pending.losses:
        return
    losses = torch.stack(pending.losses).float().cpu().tolist()
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            raise NonFiniteLoss(first_step + i, value)
    correct = torch.stack(pending.correct).sum(0).cpu().tolist()
    sums.batches += len(losses)
    sums.loss += sum(losses)
    sums.top1 += int(correct[0])
    sums.top5 += int(correct[1])
    sums.images += pending.images
    pending.losses.clear(), pending.correct.clear()
    pending.images = 0


@dataclass
class StepHooks:
    """What a caller plugs into ``train_one_epoch``; the defaults do nothing."""
    phases: Phases = field(default_factory=lambda: Phases(False, []))   # per-phase timers (--profile)
    should_stop: Callable[[], bool] = lambda: False     # asked after every step (signals)
    on_step: Callable[[EpochSums, int], None] = lambda sums, n: None    # progress bar, lr
    profiler: object | None = None                      # a torch.profiler.profile to .step()


def train_one_epoch(model: nn.Module, batches: Iterator, optimizer: torch.optim.Optimizer,
                    settings: LoopSettings, sums: EpochSums, *, first_step: int,
                    max_batches: int | None = None, hooks: StepHooks | None = None) -> str:
    """Train on ``batches`` until exhausted, ``max_batches`` steps, or ``hooks.should_stop()``.

    ``first_step`` = global step number the next step will get (1-based). ``sums`` is
    updated in place (it may already hold a resumed partial epoch). Returns "done",
    "limit" or "stopped". NaN/inf loss raises NonFiniteLoss (checked every
    ``settings.check_every`` steps and before returning).
    """
    model.train()
    hooks = hooks or StepHooks()    # a fresh one: Phases counts steps even when disabled
    pending, step, reason = _Pending(), first_step, "done"
    flushed_step = first_step
    while True:
        if max_batches is not None and step - first_step >= max_batches:
            reason = "limit"
            break
        start = time.perf_counter()
        with hooks.phases("data"):
            batch = next(batches, None)
        if batch is None:
            break
        one_step(model, optimizer, batch, settings, pending, hooks.phases)
        if hooks.profiler is not None:
            hooks.profiler.step()
        step += 1
        if len(pending.losses) >= settings.check_every:
            flush(pending, sums, flushed_step)
            flushed_step = step
        sums.seconds += time.perf_counter() - start
        hooks.on_step(sums, 1)
        if hooks.should_stop():
            reason = "stopped"
            break
    flush(pending, sums, flushed_step)
    return reason


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, settings: LoopSettings,
             pending: _Pending, phases: Phases) -> None:
    """Copy one batch to the input device, train on it, keep its loss and counts pending."""
    with phases("h2d"):
        images, labels = to_device(*batch, settings)
    loss, correct = train_step(model, optimizer, images, labels, settings, phases)
    pending.losses.append(loss), pending.correct.append(correct)
    pending.images += labels.shape[0]
    phases.count(labels.shape[0])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, settings: LoopSettings,
             on_batch: Callable[[int], None] = lambda n: None) -> dict:
    """Top-1/top-5 correct counts over ``batches``; 10-crop batches (B, 10, 3, H, W) are voted.

    Returns {"images", "top1", "top5", "loss_sum"} (sums, so ranks can add them up).
    """
    model.eval()
    # images, top-1, top-5, summed NLL; kept on the input device and read back once at the
    # end, so a GPU evaluation never waits for the device between batches
    totals = torch.zeros(4, dtype=torch.float64, device=settings.input_device)
    for images, labels in batches:
        images, labels = to_device(images.flatten(0, 1) if images.ndim == 5 else images, labels, settings)
        views = images.shape[0] // labels.shape[0]
        with autocast(settings):
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
