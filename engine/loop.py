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

from common.devices import HostCopy, sync
from pipeline.finish import U8Batch, finish
from records.format import RecordsError

from .precision import DTYPES, Precision
from .profiling import Phases
from .recipe import loss_fn
from .schedule import lr_at
from .state import TrainState
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
        hooks.phases.start_step(state.step)
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
            settle(pending, state, hooks, lag=True)
        state.sums.seconds += time.perf_counter() - start
        hooks.phases.end_step(state.step, images, labels)
        if hooks.after_step(state):
            reason = "stopped"
            break
    settle(pending, state, hooks)
    return reason


def model_rate(net: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, batch,
               steps: int, compile_model: bool = False, warmup: int = 3) -> dict:
    """The model's rate inside the training loop: ``train_step`` (forward, backward, update, the
    same precision) ``steps`` times on one batch already on the device, no loader, timed by
    the wall clock between two syncs after ``warmup`` untimed steps. What end-to-end is read
    against: their ratio is the share of the step the loader and the loop's own work cost.

    Runs on deep copies of ``net`` and ``optimizer`` (one copy, so the optimiser still holds
    the copied parameters) and of the loss scaler, under ``torch.random.fork_rng`` (dropout
    draws restored), so the run's weights, optimiser state, scale and random streams are
    exactly as before: a profiled run continues, saves and resumes bitwise as an unprofiled
    one. ``compile_model``: the copy is compiled as the run's model was (its compile time
    falls in the untimed steps). Returns {"steps", "images_per_s"} (None: no batch kept)."""
    import copy
    if batch is None or steps < 1:
        return {"steps": 0, "images_per_s": None}
    images, labels = batch
    devices = sorted({str(p.device) for p in net.parameters()})
    cuda = [d for d in devices if d.startswith("cuda")]
    net_copy, opt_copy = copy.deepcopy((net, optimizer))
    prec = Precision(precision.amp, precision.device_type)
    prec.load_state_dict(precision.state_dict())
    model = torch.compile(net_copy) if compile_model else net_copy
    was_training, phases = net_copy.training, Phases(False, [])
    with torch.random.fork_rng(devices=[torch.device(d) for d in cuda]):
        model.train()
        for _ in range(warmup):
            train_step(model, opt_copy, images, labels, prec, phases)
        sync(cuda)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt_copy, images, labels, prec, phases)
        sync(cuda)
        seconds = time.perf_counter() - start
    net_copy.train(was_training)
    return {"steps": steps, "images_per_s": steps * labels.shape[0] / seconds if seconds > 0 else None}


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


def settle(pending: "_Pending", state: TrainState, hooks: StepHooks, lag: bool = False) -> None:
    """Read the pending steps back into ``state.sums``, then agree with the other ranks: a
    NaN/inf loss on any rank raises NonFiniteLoss on all of them.

    ``lag`` (the periodic read-back): the span just finished is only queued for copying
    (``HostCopy``: pinned memory and an event, no drain) and read at the next read-back, or now
    if the device is already past it (always on the CPU, where the copy is a plain copy); the
    span before it is read now, waiting only for its own copy. So on a GPU the host reads one
    span behind the device and the queue never runs dry at a read-back, a NaN/inf loss is
    found up to one span later than it happened (still naming its exact step; the steps of the
    span after it run and are thrown away with the rest: nothing non-finite is saved), and
    ``state.sums`` / ``state.read_step`` may lag ``state.step`` by a span (step lines show what
    was read). Without ``lag`` (on return: the epoch's end, --max-steps, a stop; before a bad
    record's save) everything is read: the sums then hold every step done. Spans are added in
    order whatever the timing, so the sums are bitwise those of reading every span at once."""
    bad = pending.flush_into(state, lag)
    if hooks.agree(NONFINITE if bad is not None else OK) == NONFINITE:
        raise NonFiniteLoss(*(bad or (state.step, None)))


@dataclass
class _Span:
    """One read-back's worth of steps, copied to the host: losses, then top-1/top-5 correct
    summed, then (fp16) the skipped-update count, packed as float64 (exact for float32
    losses and integer counts) so one copy and one event carry them."""
    copy: HostCopy
    last_step: int                          # the global step of its last loss
    steps: int
    images: int
    fp16: bool

    def add_to(self, state: TrainState) -> tuple[int, float] | None:
        """Add to ``state.sums`` (waiting for the copy if need be); (step, value) of the first
        NaN/inf loss instead (nothing added)."""
        values = self.copy.get().tolist()
        losses, counts = values[:self.steps], values[self.steps:]
        first = self.last_step - self.steps + 1
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                return first + i, value
        sums = state.sums
        if self.fp16:
            sums.amp_skipped += int(counts[2])
        sums.loss += sum(losses)
        sums.top1 += int(counts[0])
        sums.top5 += int(counts[1])
        sums.images += self.images
        state.read_step = self.last_step
        return None


@dataclass
class _Pending:
    """Per-step device tensors not yet read back to the host (reading forces a sync): the
    losses of the steps up to the state's current one, and the spans copied but not yet read."""
    losses: list = field(default_factory=list)
    correct: list = field(default_factory=list)
    skipped: list = field(default_factory=list)   # fp16 only: 0-dim bool, True = update skipped
    images: int = 0
    copied: list = field(default_factory=list)    # _Span, oldest first

    def add(self, loss: torch.Tensor, correct: torch.Tensor, skipped: torch.Tensor | None, images: int) -> None:
        self.losses.append(loss), self.correct.append(correct)
        if skipped is not None:
            self.skipped.append(skipped)
        self.images += images

    def _copy(self, step: int) -> None:
        """Queue the current steps' copy to the host (``step``: the global step of the last)."""
        if not self.losses:
            return
        losses = torch.stack(self.losses).double()
        parts = [losses, torch.stack(self.correct).sum(0).double().to(losses.device)]
        if self.skipped:   # the flags may sit on another device (or the host) than the losses
            parts.append(torch.stack([f.to(losses.device) for f in self.skipped]).sum().double().reshape(1))
        self.copied.append(_Span(HostCopy(torch.cat(parts)), step, len(self.losses), self.images,
                                 bool(self.skipped)))
        self.losses, self.correct, self.skipped, self.images = [], [], [], 0

    def flush_into(self, state: TrainState, lag: bool = False) -> tuple[int, float] | None:
        """Add the read spans to ``state.sums`` in order (see ``settle``); (step, value) of the
        first NaN/inf loss instead."""
        self._copy(state.step)
        while self.copied:
            span = self.copied[0]
            if lag and len(self.copied) == 1 and not span.copy.ready():
                break                        # the span just queued waits for the next read-back
            self.copied.pop(0)
            bad = span.add_to(state)
            if bad is not None:
                return bad
        return None


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
