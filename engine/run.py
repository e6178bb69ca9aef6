"""A training run from start to end: devices, run folder, resume, epochs, final 10-crop table.

``main(argv)`` is what train.py calls. The pieces it glues (the epoch loop, checkpoints,
the schedule, DDP, profiling) live in their own modules; this one decides the order.
Exit status: 0 done, 2 bad input (one ``error:`` line), 3 NaN/inf loss,
128+signal after SIGINT/SIGTERM (checkpoint saved, resumable).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic import append_line, write_json
from common.config import ConfigError, from_dict, to_dict
from model import AlexNet
from pipeline import Loader, LoaderError
from prep.records import DEFAULT_RECORDS, RecordsError, read_meta

from . import checkpoint as ckpt
from . import distributed as D
from .config import MODEL_FIELDS, TrainConfig, merge_explicit, parse_train_args
from .loop import EpochSums, LoopSettings, NonFiniteLoss, StepHooks, eval_metrics, evaluate, train_one_epoch
from .profiling import Phases, trace_profiler
from .recipe import make_optimizer
from .report import Reporter, crops_table, epoch_line, epochs_table, profile_table
from .schedule import PlateauSchedule, lr_at
from .signals import StopFlag

REAL_THING = ("The real thing, on ImageNet with two GPUs:\n"
              "  python prep/build_records.py --source /data/imagenet --out /data/records\n"
              "  python train.py --gpus 0,1 --records /data/records --out runs/alexnet")


class RunError(Exception):
    """A run folder or resume problem; one line."""


@dataclass
class Run:
    cfg: TrainConfig
    info: D.DistInfo
    devices: list[str]
    records: Path
    classes: int
    out: Path
    say: Reporter
    net: nn.Module = None          # the AlexNet (placed); checkpoints save its state
    model: nn.Module = None        # what trains: net, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer = None
    schedule: PlateauSchedule = None
    settings: LoopSettings = None
    epoch: int = 0                 # completed epochs
    step: int = 0                  # optimiser steps done
    sums: EpochSums = field(default_factory=EpochSums)   # the current epoch's, when resumed mid-epoch
    history: list = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_train_args(argv)
    info = D.dist_info_from_env()
    say = Reporter(info.is_main, cfg.progress)
    try:
        if cfg.eval_only:
            return eval_only(cfg, info, say)
        return train(cfg, argv, info, say)
    except (RecordsError, LoaderError, ckpt.CheckpointError, D.DeviceError, RunError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.shutdown(info)


# --- setup ------------------------------------------------------------------------------

def resolve_records(cfg: TrainConfig) -> tuple[Path, int]:
    """The records folder and its number of classes; a missing default gets a hint."""
    records = Path(cfg.records) if cfg.records else DEFAULT_RECORDS
    if not records.exists():
        hint = "" if cfg.records else " (run prep/build_records.py first, or pass --records DIR)"
        raise RecordsError(f"{records}: records folder does not exist{hint}")
    return records, len(read_meta(records)["classes"])


def setup_devices(cfg: TrainConfig, info: D.DistInfo, say: Reporter) -> list[str]:
    devices = D.replica_devices(cfg, info, torch.cuda.device_count())
    if devices == ["cpu"]:
        why = "--gpus ''" if cfg.gpus == "" else "no CUDA GPU visible"
        say.line(f"train: {why}: training on the CPU (slow: tens of images/s; see README for GPUs)")
    D.init_process_group(info, devices)
    return devices


def build_net(cfg: TrainConfig, classes: int, devices: list[str]) -> AlexNet:
    """The AlexNet of the config, initialised from the seed (the same on every rank), placed."""
    torch.manual_seed(cfg.seed)
    net = AlexNet(cfg.model_config(classes))
    net.place(D.tower_devices(devices, cfg.towers))
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def load_net_state(net: nn.Module, state: dict, path: Path) -> None:
    try:
        net.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ckpt.CheckpointError(f"{path}: its weights do not fit this model ({first})") from None


def wrap_model(net: nn.Module, cfg: TrainConfig, info: D.DistInfo) -> nn.Module:
    model = D.wrap_ddp(net, info)
    return torch.compile(model) if cfg.compile else model


def epoch_seed(seed: int, epoch: int) -> int:
    """The loader seed of one epoch: a fixed function of (seed, epoch), so resuming at epoch k
    rebuilds exactly the data order and augmentations of an uninterrupted run's epoch k."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] % (2 ** 31))


def make_loader(run: Run, split: str, view: str, epoch: int = 0) -> Loader:
    cfg = run.cfg
    batch = max(1, cfg.batch_size // 10) if view == "tencrop" else cfg.batch_size  # ~batch_size views
    return Loader(run.records, split=split, view=view, batch_size=batch, device=run.devices[0],
                  shard=(run.info.rank, run.info.world), seed=epoch_seed(cfg.seed, epoch),
                  mean=cfg.mean, num_threads=cfg.workers)


def run_folder(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


# --- training ---------------------------------------------------------------------------

def train(cfg: TrainConfig, argv: list[str], info: D.DistInfo, say: Reporter) -> int:
    state = None
    if cfg.resume:
        state = ckpt.load(Path(cfg.resume) / "last.pt")
        saved = from_dict(TrainConfig, state["config"])
        cfg, changes = merge_explicit(saved, argv, cfg)
        cfg = replace(cfg, out=cfg.resume)
        say.line(f"train: resuming {cfg.resume} at epoch {state['epoch'] + 1}, step {state['step']}"
                 + (f" (overriding: {'; '.join(changes)})" if changes else ""))
    out = Path(cfg.out) if cfg.resume else run_folder(cfg)
    if not cfg.resume and (out / "last.pt").exists():
        raise RunError(f"{out}: already holds a run (last.pt); continue it with --resume {out} or pick another --out")
    records, classes = resolve_records(cfg)
    devices = setup_devices(cfg, info, say)
    run = Run(cfg=cfg, info=info, devices=devices, records=records, classes=classes, out=out, say=say)
    prepare(run, state)
    if info.is_main:
        write_json(out / "config.json", {**to_dict(cfg), "out": str(out), "devices": devices,
                                         "world": info.world, "classes": classes})
    stop = StopFlag().install()       # from here on a signal means: finish the step, save, exit
    say.line(f"train: run folder {out}; {classes} classes; devices {', '.join(devices)}; world {info.world}")
    return train_epochs(run, stop)


def prepare(run: Run, state: dict | None) -> None:
    """Model, optimiser, schedule and counters; from the checkpoint when resuming."""
    cfg = run.cfg
    run.net = build_net(cfg, run.classes, run.devices)
    run.optimizer = make_optimizer(run.net, cfg)
    run.schedule = PlateauSchedule(lr=cfg.lr, patience=cfg.plateau_patience, threshold=cfg.plateau_threshold)
    torch.manual_seed(cfg.seed + 1 + run.info.rank)   # dropout masks: different per rank
    if state is not None:
        restore(run, state)
    run.model = wrap_model(run.net, cfg, run.info)
    run.settings = LoopSettings(input_device=run.net.input_device, amp=cfg.amp, channels_last=cfg.channels_last)


def restore(run: Run, state: dict) -> None:
    path = Path(run.cfg.resume) / "last.pt"
    load_net_state(run.net, state, path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    # the paper's lr drops were decisions by hand: an explicit --lr on resume replaces the schedule's
    if run.cfg.lr != state["config"]["lr"]:
        run.schedule.lr = run.cfg.lr
    run.schedule.patience, run.schedule.threshold = run.cfg.plateau_patience, run.cfg.plateau_threshold
    run.epoch, run.step = int(state["epoch"]), int(state["step"])
    run.sums = EpochSums(**state["sums"])
    run.history = list(state.get("history", []))
    rngs = state["rng"]
    if len(rngs) == run.info.world:
        ckpt.set_rng_state(rngs[run.info.rank])
    else:
        run.say.line(f"train: world size changed ({len(rngs)} -> {run.info.world}): dropout RNG reseeded, "
                     "so the continuation is not bitwise identical")


def train_epochs(run: Run, stop: StopFlag) -> int:
    cfg = run.cfg
    phases = Phases(cfg.profile, run.devices)
    try:
        while run.epoch < cfg.epochs and not steps_exhausted(run):
            finished = train_epoch(run, stop, phases)
            if not finished:
                return interrupted(run, stop)
    except NonFiniteLoss as exc:
        last = run.out / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        print(f"error: {exc}; stopped without saving ({kept}); try a lower --lr", file=sys.stderr)
        return 3
    finally:
        stop.restore()
    if cfg.profile:
        report_profile(run, phases)
    finish(run)
    return 0


def steps_exhausted(run: Run) -> bool:
    return run.cfg.max_steps is not None and run.step >= run.cfg.max_steps


def epoch_budget(run: Run) -> int | None:
    """Steps this epoch may still take (epoch_steps cap, max_steps cap), None = no cap."""
    caps = []
    if run.cfg.epoch_steps is not None:
        caps.append(run.cfg.epoch_steps - run.sums.batches)
    if run.cfg.max_steps is not None:
        caps.append(run.cfg.max_steps - run.step)
    return max(0, min(caps)) if caps else None


def train_epoch(run: Run, stop: StopFlag, phases: Phases) -> bool:
    """One epoch (or the rest of a resumed one), then validation, schedule and checkpoint.
    False if a signal stopped it (the caller saves mid-epoch)."""
    cfg, e = run.cfg, run.epoch
    loader = make_loader(run, "train", "train", epoch=e)
    # resumed mid-epoch: start at the first batch not trained on; the Loader neither reads nor
    # decodes the ones before, and later batches equal those of an uninterrupted epoch
    batches = loader.iter_epoch(loader.epoch, start=run.sums.batches)
    budget = epoch_budget(run)
    total = min(len(loader), run.sums.batches + budget) if budget is not None else len(loader)
    should_stop = stop_poll(run, stop)
    profiler = trace_profiler(cfg.profile and run.info.is_main and e == 0, run.out)
    steps = [run.step]                   # global steps done, counted as they happen
    set_lr(run, steps[0])
    with run.say.bar(f"epoch {e + 1}/{cfg.epochs}", total, run.sums.batches) as advance, profiler:
        def on_step(sums: EpochSums, n: int) -> None:
            steps[0] += n
            set_lr(run, steps[0])
            advance(n, info=f"{sums.images / sums.seconds:.1f} img/s" if sums.seconds else "")
        before = run.sums.batches
        hooks = StepHooks(phases=phases, should_stop=should_stop, on_step=on_step,
                          profiler=profiler if cfg.profile else None)
        reason = train_one_epoch(run.model, batches, run.optimizer, run.settings, run.sums,
                                 first_step=run.step + 1, max_batches=budget, hooks=hooks)
    run.step += run.sums.batches - before
    del batches, loader
    if reason == "stopped":
        return False
    end_epoch(run)
    return True


def stop_poll(run: Run, stop: StopFlag):
    """What the loop asks after each step: has a signal asked us to stop?

    One process: the flag itself, every step. Distributed: every rank must stop after the
    same step, which takes a collective (an all-reduce and a device->host read), so it is
    polled every ``check_every`` steps (the loop's own read-back cadence) on a count every
    rank shares; a signal waits at most that many steps.
    """
    if not run.info.enabled:
        return lambda: bool(stop)
    every, calls = run.settings.check_every, [0]

    def poll() -> bool:
        calls[0] += 1
        return calls[0] % every == 0 and D.any_rank(bool(stop), run.devices[0])
    return poll


def set_lr(run: Run, done: int) -> None:
    """Write the lr for the step after ``done`` global steps into the optimizer: the only
    place the optimizer's lr is set (the schedule's lr with the warm-up, ``lr_at``)."""
    lr = lr_at(run.schedule.lr, done, run.cfg.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr


def end_epoch(run: Run) -> None:
    """Validate on the centre crop, step the lr schedule, log a metrics line, save checkpoints."""
    cfg = run.cfg
    val = validate(run, "center")
    m = {"epoch": run.epoch + 1, "step": run.step, "lr": run.schedule.lr, **run.sums.metrics(),
         "val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"], "val_loss": val["loss"],
         "epoch_seconds": run.sums.seconds, "train_images": run.sums.images * run.info.world}
    run.history.append(m)
    run.say.line(epoch_line(m, cfg.epochs))
    is_best = val["top1_err"] < min((h["val_top1_err"] for h in run.history[:-1]), default=float("inf"))
    if run.schedule.step(val["top1_err"]):   # the next epoch's set_lr puts it in the optimizer
        run.say.line(f"train: validation top-1 error stopped improving for {cfg.plateau_patience} epoch(s): "
                     f"lr divided by 10 -> {run.schedule.lr:.3g}")
    run.epoch, run.sums = run.epoch + 1, EpochSums()
    if run.info.is_main:
        append_line(run.out / "metrics.jsonl", json.dumps(m))
    save_checkpoint(run, best=is_best)


def validate(run: Run, view: str) -> dict:
    loader = make_loader(run, "val", view)
    with run.say.bar(f"  val {view}", loader.epoch_size) as advance:
        sums = evaluate(run.net, loader, run.settings, on_batch=advance)
    keys = ("images", "top1", "top5", "loss_sum")
    totals = D.all_reduce_sum([sums[k] for k in keys], run.devices[0])
    return eval_metrics(dict(zip(keys, totals)))


def checkpoint_state(run: Run) -> dict:
    """Everything a bitwise-exact continuation needs; tensors and plain containers only."""
    return {"model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(), "epoch": run.epoch, "step": run.step,
            "sums": run.sums.as_dict(),   # the epoch's done batches: where the loader resumes
            "rng": D.gather_objects(ckpt.rng_state(), run.info),
            "history": run.history, "config": to_dict(run.cfg)}


def save_checkpoint(run: Run, best: bool = False) -> None:
    state = checkpoint_state(run)      # every rank joins the RNG gather; rank 0 writes
    if run.info.is_main:
        ckpt.save(run.out / "last.pt", state)
        if best:
            ckpt.link(run.out / "last.pt", run.out / "best.pt")
    D.barrier(run.info)


def interrupted(run: Run, stop: StopFlag) -> int:
    save_checkpoint(run)
    run.say.line(f"train: {stop.name or 'stop'} received: saved {run.out / 'last.pt'} after step {run.step} "
                 f"(epoch {run.epoch + 1}, batch {run.sums.batches}). Continue exactly with:\n"
                 f"  python train.py --resume {run.out}")
    return stop.exit_code


def finish(run: Run) -> None:
    """End of training: the per-epoch table, then single-crop vs 10-crop error on the final weights."""
    if run.history:
        run.say.table(epochs_table(run.history))
    if not run.cfg.final_eval:
        return
    single, ten = validate(run, "center"), validate(run, "tencrop")
    run.say.table(crops_table(single, ten, run.classes))
    if run.info.is_main:
        write_json(run.out / "eval.json", {"epoch": run.epoch, "step": run.step, "center": single, "tencrop": ten})
    run.say.line(f"train: done; run folder {run.out} (config.json, metrics.jsonl, last.pt, best.pt, eval.json)")
    if run.cfg.demo:
        run.say.line(REAL_THING)


def report_profile(run: Run, phases: Phases) -> None:
    summary = phases.summary()
    run.say.table(profile_table(summary, run.devices))
    if run.info.is_main:
        write_json(run.out / "profile.json", {**summary, "devices": run.devices,
                                              "trace": str(run.out / "trace.json")})
        run.say.line(f"train: profile in {run.out / 'profile.json'}, Chrome trace in {run.out / 'trace.json'}")


# --- evaluation only --------------------------------------------------------------------

def eval_only(cfg: TrainConfig, info: D.DistInfo, say: Reporter) -> int:
    """--eval-only --checkpoint PATH: single-crop and 10-crop error of a checkpoint's weights.
    The model switches come from the checkpoint's own config."""
    path = Path(cfg.checkpoint)
    state = ckpt.load(path)
    saved = from_dict(TrainConfig, state["config"])
    cfg = replace(cfg, **{k: getattr(saved, k) for k in MODEL_FIELDS})
    records, classes = resolve_records(cfg)
    devices = setup_devices(cfg, info, say)
    run = Run(cfg=cfg, info=info, devices=devices, records=records, classes=classes,
              out=Path(cfg.out) if cfg.out else path.parent, say=say)
    run.net = build_net(cfg, classes, devices)
    load_net_state(run.net, state, path)
    run.settings = LoopSettings(input_device=run.net.input_device, amp=cfg.amp, channels_last=cfg.channels_last)
    single, ten = validate(run, "center"), validate(run, "tencrop")
    say.table(crops_table(single, ten, classes))
    say.line(f"train: evaluated {path} (epoch {state['epoch']}, step {state['step']})")
    return 0
