"""A training run from start to end: setup, then ``for epoch: train -> validate -> schedule -> save``.

``main(argv)`` is what train.py calls. The step loop is engine/loop.py (``train_steps``), where
a run is is engine/state.py (``TrainState``, the checkpoint's training part); this module
builds the pieces once (``Session``) and decides the order.
Exit status: 0 done (or stopped by --max-steps, resumable), 2 bad input or OS problem (one
``error:`` line; the last good checkpoint intact), 3 NaN/inf loss or weights (nothing
non-finite saved), 128+signal after SIGINT/SIGTERM (checkpoint saved, resumable). Under
torchrun every rank stops with the same status: a fault one rank meets (a bad record, a write
only rank 0 does) is agreed on before the next collective, so no rank is left waiting in it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from common.atomic import LockHeld, append_line, lock_folder, unlock_folder, write_json, write_text
from common.config import from_dict, to_dict
from common.system import usable_cores
from common.errors import UserError, error_line
from model import AlexNet
from pipeline import Loader
from prep.records import DEFAULT_RECORDS, RecordsError, read_meta

from . import checkpoint as ckpt
from . import distributed as D
from . import logs
from .config import MODEL_FIELDS, TrainConfig, explicit_flags, merge_explicit, parse_train_args
from .loop import LoopSettings, NonFiniteLoss, StepHooks, StepPlan, eval_metrics, evaluate, to_device, train_steps
from .precision import Precision
from .profiling import Phases, trace_profiler
from .recipe import make_optimizer, set_hyperparameters
from .report import Reporter, crops_table, epoch_line, epochs_table, profile_table
from .schedule import PlateauSchedule
from .signals import Interrupted, StopFlag
from .state import KEYS, TrainState

REAL_THING = ("The real thing, on ImageNet with two GPUs:\n"
              "  python prep/build_records.py --source /data/imagenet --out /data/records\n"
              "  python train.py --gpus 0,1 --records /data/records --out runs/alexnet")


T = TypeVar("T")


class RunError(UserError):
    """A run folder or resume problem; one line."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_train_args(argv)
    info = D.dist_info_from_env()
    say = Reporter(info.is_main, cfg.progress)
    try:
        if cfg.eval_only:
            return eval_only(cfg, info, say)
        return train(cfg, argv, info, say)
    except (UserError, OSError) as exc:   # OSError: disk full, read-only, a file where a folder should be ...
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:             # Ctrl-C at once (a second one, or one before training): no traceback
        print("train: interrupted; checkpoints on disk are whole (written atomically): a run that has "
              "one continues with python train.py --resume RUN", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        D.shutdown(info)


# --- setup ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordsData:
    """The run's loaders: the training batches (epoch e's order and augmentation fixed by
    (seed, e): the Loader derives both from the pair, ``iter_epoch(e, start)``) and the
    validation views. ``device`` is where DALI runs, ``dtype`` what it yields (uint8: the engine
    finishes the batch on the model's device, see ``loader_placement``).

    Each loader is built once and kept for the run: building one parses every index file and
    builds a DALI graph (seconds on ImageNet), its label cache fills during the first epoch,
    and a kept train loader has the next epoch's first batches decoded during validation."""
    records: Path
    cfg: TrainConfig
    info: D.DistInfo
    device: str
    dtype: torch.dtype = torch.float32
    _built: dict = field(default_factory=dict, compare=False, repr=False)

    def train(self, epoch: int) -> Loader:
        return self._loader("train", "train", self.cfg.batch_size, epoch)

    def val(self, view: str) -> Loader:
        batch = max(1, self.cfg.batch_size // 10) if view == "tencrop" else self.cfg.batch_size  # ~batch_size views
        return self._loader("val", view, batch, 0)

    def _loader(self, split: str, view: str, batch: int, epoch: int) -> Loader:
        if (split, view) not in self._built:
            self._built[split, view] = Loader(
                self.records, split=split, view=view, batch_size=batch, device=self.device,
                shard=(self.info.rank, self.info.world), seed=self.cfg.seed, epoch=epoch, dtype=self.dtype,
                mean=self.cfg.mean, num_threads=D.dali_threads(self.cfg.workers, self.info, usable_cores()))
        return self._built[split, view]


def loader_placement(cfg: TrainConfig, model_device: str) -> tuple[str, torch.dtype]:
    """(where DALI runs, what it yields) for --loader-device and the model's input device.

    uint8 whenever the batch must still cross to the model's device (DALI on the CPU: 1 byte
    per value over PCIe instead of 4) or when the model wants channels_last (``finish`` writes
    NHWC directly; the float view would need a copy per batch). ``finish`` gives exactly the
    float view's values. A CPU model keeps the float view under auto: on the CPU, finishing
    is an extra pass over the batch."""
    on_gpu = model_device.startswith("cuda")
    if cfg.loader_device == "gpu" and not on_gpu:
        raise RunError("--loader-device gpu: the model trains on the CPU here (no GPU visible or --gpus '')")
    if cfg.loader_device == "cpu":
        return "cpu", torch.uint8
    if on_gpu:
        return model_device, torch.uint8 if cfg.channels_last else torch.float32
    return "cpu", torch.float32


@dataclass(frozen=True)
class Session:
    """What a run's epochs need, built once: nothing here changes while training (TrainState does)."""
    cfg: TrainConfig
    info: D.DistInfo
    devices: list[str]
    out: Path
    say: Reporter
    data: RecordsData              # or anything with .train(epoch) -> a loader with len() and iter_epoch(epoch, start), and .val(view)
    classes: int
    net: nn.Module                 # the AlexNet (placed); checkpoints save its state
    model: nn.Module               # what trains: net, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    settings: LoopSettings
    precision: Precision
    host_group: object = None      # gloo group for per-step agreement between ranks (None: one process)


def resolve_records(cfg: TrainConfig, world: int = 1) -> tuple[Path, int]:
    """The records folder and its number of classes; a missing default gets a hint. Every one
    of the ``world`` ranks validates its own share of the val split, so it needs a record each."""
    records = Path(cfg.records) if cfg.records else DEFAULT_RECORDS
    if not records.exists():
        hint = "" if cfg.records else " (run prep/build_records.py first, or pass --records DIR)"
        raise RecordsError(f"{records}: records folder does not exist{hint}")
    meta = read_meta(records)
    try:   # checked now, not when the first epoch's validation starts hours later
        val = int(meta["counts"]["val"])
    except (KeyError, TypeError, ValueError):
        val = 0
    if val < 1:
        raise RecordsError(f"{records / 'meta.json'}: no validation records (split 'val'); training "
                           "validates every epoch: rebuild with SOURCE/val (or --val-labels)")
    if val < world:
        raise RecordsError(f"{records / 'meta.json'}: {val} validation record(s) for {world} ranks; each rank "
                           "validates its own share: run fewer ranks or add validation images")
    return records, len(meta["classes"])


def setup_devices(cfg: TrainConfig, info: D.DistInfo, say: Reporter) -> list[str]:
    devices = D.replica_devices(cfg, info, torch.cuda.device_count())
    if devices == ["cpu"]:
        why = "--gpus ''" if cfg.gpus == "" else "no CUDA GPU visible"
        say.line(f"train: {why}: running on the CPU (slow: tens of images/s; see README for GPUs)")
    say.line(D.allocation_line(info, devices, cfg.workers, usable_cores()))
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


def build_session(cfg: TrainConfig, info: D.DistInfo, say: Reporter, out: Path) -> Session:
    records, classes = resolve_records(cfg, info.world)
    # absolute in the checkpoint and config.json: a resume from another directory finds them
    cfg = replace(cfg, records=str(records.absolute()))
    devices = setup_devices(cfg, info, say)
    if devices[0].startswith("cuda"):
        # let cuDNN time its convolution algorithms for our fixed shapes once and keep the
        # fastest (every step has the same shapes); torchvision's, timm's, FFCV's and DALI's
        # training scripts and our model bench all do this, so bench and run measure the same
        torch.backends.cudnn.benchmark = True
    net = build_net(cfg, classes, devices)
    torch.manual_seed(cfg.seed + 1 + info.rank)   # dropout masks: different per rank
    model = D.wrap_ddp(net, info)
    loader_device, dtype = loader_placement(cfg, str(net.input_device))
    return Session(cfg=cfg, info=info, devices=devices, out=out, say=say, classes=classes,
                   data=RecordsData(records, cfg, info, loader_device, dtype), net=net,
                   model=torch.compile(model) if cfg.compile else model,
                   optimizer=make_optimizer(net, cfg),
                   settings=LoopSettings(input_device=net.input_device, amp=cfg.amp, channels_last=cfg.channels_last,
                                         check_every=logs.read_back_every(cfg.log_every)),
                   precision=Precision(cfg.amp, net.input_device.type), host_group=D.host_group(info))


def new_state(cfg: TrainConfig, world: int) -> TrainState:
    return TrainState(schedule=PlateauSchedule(lr=cfg.lr, patience=cfg.plateau_patience,
                                               threshold=cfg.plateau_threshold, max_drops=cfg.max_lr_drops),
                      seed=cfg.seed, batch_size=cfg.batch_size, world=world)


def run_folder(cfg: TrainConfig) -> Path:
    """The run folder (created later, by its first write); an existing file there is a one-line error."""
    out = Path(cfg.out) if cfg.out else Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder; pick another --out")
    return out


RUN_LOCK = ".train.lock"          # in the run folder; flock'ed by the rank-0 process training it


def _stat_key(what: Path | os.stat_result) -> tuple:
    st = what if isinstance(what, os.stat_result) else os.stat(what)
    return st.st_ino, st.st_size, st.st_mtime_ns


def remove_stale_temps(out: Path) -> None:
    """Temp files of writes a kill interrupted (common.atomic names them .NAME.*.tmp)."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# --- resume -----------------------------------------------------------------------------

RESUME_KEYS = ("model", "optimizer", "config", *KEYS)


def resume_paths(resume: str) -> tuple[Path, Path]:
    """--resume RUN_DIR or --resume RUN_DIR/last.pt (any checkpoint file): (checkpoint, run folder)."""
    path = Path(resume)
    return (path / "last.pt", path) if path.is_dir() else (path, path.parent)


def saved_config(state: dict, path: Path) -> TrainConfig:
    try:
        return from_dict(TrainConfig, state["config"])
    except (ValueError, TypeError) as exc:       # ConfigError is a ValueError
        raise ckpt.CheckpointError(f"{path}: its saved config is not valid here: {exc}") from None


def resume_config(cfg: TrainConfig, argv: list[str], path: Path, state: dict,
                  say: Reporter) -> tuple[TrainConfig, TrainConfig]:
    """(the saved config with the flags given now on top, the saved config); the saved GPU
    layout only if it fits."""
    saved = saved_config(state, path)
    cfg, changes = merge_explicit(saved, argv, cfg)
    if "gpus" not in explicit_flags(argv):
        ids, visible = cfg.gpu_ids() or [], torch.cuda.device_count()
        if any(i >= visible for i in ids):
            raise RunError(f"{path}: saved with --gpus {cfg.gpus!r}, but {visible} GPU(s) are visible here; "
                           "pass --gpus to choose this machine's layout (weights, momentum and schedule carry over)")
    say.line(f"train: resuming {path} at epoch {state['epoch'] + 1}, batch {state['batch']}, step {state['step']}"
             + (f" (overriding: {'; '.join(changes)})" if changes else ""))
    return cfg, saved


def restore(s: Session, state: TrainState, saved: dict, path: Path, lr_given: bool) -> None:
    """Weights, momentum, TrainState and RNG from a checkpoint, checked against this run's layout."""
    if ckpt.nonfinite_tensor({"model": saved["model"], "optimizer": saved["optimizer"]}):
        raise ckpt.CheckpointError(f"{path}: holds NaN/inf weights or momentum; resume from an earlier checkpoint")
    try:
        s.net.load_state_dict(saved["model"])
        s.optimizer.load_state_dict(saved["optimizer"])
        set_hyperparameters(s.optimizer, s.cfg)     # the resumed run's flags, not the saved ones
        state.load_state_dict(saved)
        s.precision.load_state_dict(saved.get("precision") or {})   # fp16: the loss scale goes on
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ckpt.CheckpointError(f"{path}: does not fit this model or run ({first})") from None
    cfg, world = s.cfg, s.info.world
    now, then = (cfg.batch_size, world, cfg.seed), (state.batch_size, state.world, state.seed)
    if state.batch and now != then:
        # the epoch's first `batch` steps were batches of the saved size and data order: another
        # size, rank count or seed would replay a different set of images
        raise RunError(f"{path}: saved mid-epoch (epoch {state.epoch + 1}, batch {state.batch}) with --batch-size "
                       f"{then[0]} x {then[1]} rank(s), --seed {then[2]}; resume with those (now {now[0]} x {now[1]}, "
                       f"--seed {now[2]}) or from a checkpoint at an epoch's end")
    state.batch_size, state.world, state.seed = now
    sched = state.schedule
    sched.patience, sched.threshold, sched.max_drops = cfg.plateau_patience, cfg.plateau_threshold, cfg.max_lr_drops
    if lr_given:           # the paper's lr drops were decisions by hand: an explicit --lr always wins
        sched.lr = cfg.lr
    if len(state.rng) == world:
        note = ckpt.set_rng_state(state.rng[s.info.rank])
        if note:
            s.say.line(f"train: {note}: those GPUs' dropout RNG reseeded, the continuation is not bitwise identical")
    else:
        s.say.line(f"train: world size changed ({len(state.rng)} -> {world}): dropout RNG reseeded, "
                   "so the continuation is not bitwise identical")


# --- training ---------------------------------------------------------------------------

def train(cfg: TrainConfig, argv: list[str], info: D.DistInfo, say: Reporter) -> int:
    saved, path, lr_given, read = None, None, False, None
    continuing = cfg.auto_resume and (Path(cfg.out) / "last.pt").exists()
    if cfg.resume or continuing:
        path, out = resume_paths(cfg.resume or cfg.out)
        if cfg.resume and cfg.out and Path(cfg.out).resolve() != out.resolve():
            raise RunError(f"--out {cfg.out}: a resumed run continues in its own folder ({out}); to branch it, "
                           f"copy that folder and resume the copy")
        read = (path, os.stat(path)) if path.is_file() else None    # before the load: see run_session
        saved = ckpt.load(path, keys=RESUME_KEYS)
        cfg, saved_cfg = resume_config(cfg, argv, path, saved, say)
        cfg = replace(cfg, out=str(out))
        # --resume: an explicit --lr always wins. --auto-resume reruns the command that started
        # the run, so its --lr is an override only when it differs from the saved one (else every
        # restart would undo the plateau schedule's lr drops).
        lr_given = cfg.lr != saved_cfg.lr if continuing else "lr" in explicit_flags(argv)
    elif cfg.out and (Path(cfg.out) / "last.pt").exists():
        raise RunError(f"{cfg.out}: already holds a run (last.pt); continue it with --resume {cfg.out} "
                       "(or start runs with --auto-resume) or pick another --out")
    out = run_folder(cfg)
    if cfg.tensorboard and not logs.tensorboard_available():     # before any device or file is touched
        raise RunError(logs.TENSORBOARD_MISSING)
    s = build_session(cfg, info, say, out)
    state = new_state(cfg, info.world)
    reads = records_signature(s.data.records)
    if saved is not None:
        restore(s, state, saved, path, lr_given=lr_given)
        together(s, lambda: check_records(state, reads, path, s.data.records, say))   # node-local copies may differ
    state.records = reads
    check_same_start(s, state)
    if saved is not None and (why := nothing_left(cfg, state)) and not final_eval_missing(s, state):
        # a resumed run with nothing to train says so and touches nothing: no "done", no new
        # evaluation, no profile of zero steps over the one it measured
        say.line(f"train: {s.out} {why}; nothing to train")
        return 0
    return run_session(s, state, read)


def records_signature(records: Path) -> dict:
    """What a resume must find again: the train split's size (each epoch's order is a
    permutation of that many records) and the class list (the net's outputs, in order)."""
    meta = read_meta(records)
    classes = hashlib.sha1(json.dumps(meta["classes"]).encode()).hexdigest()[:16]
    return {"train": int(meta["counts"]["train"]), "classes": classes}


def check_records(state: TrainState, now: dict, path: Path, records: Path, say: Reporter) -> None:
    """The saved run's records against these: other classes are refused (the outputs would mean
    other things); another train count is refused mid-epoch (the rest of the epoch's order would
    not be the rest of the one begun: images twice or never) and said at an epoch's end. Records
    repaired or rebuilt from the same source pass."""
    then = state.records
    if then is None:                       # a checkpoint from before the records were noted
        return
    if then["classes"] != now["classes"]:
        raise RunError(f"{path}: trained on records with other classes (names or order) than {records}; "
                       "resume with the records it was trained on (--records DIR)")
    if then["train"] != now["train"]:
        if state.batch:
            raise RunError(f"{path}: saved mid-epoch (epoch {state.epoch + 1}, batch {state.batch}) on "
                           f"{then['train']} train records, but {records} holds {now['train']}: the rest of the "
                           "epoch would not be the rest of its order; resume with those records or from a "
                           "checkpoint at an epoch's end")
        say.line(f"train: {records} holds {now['train']} train records, the run so far read {then['train']}; "
                 "the epochs from here on read these")


def final_eval_missing(s: Session, state: TrainState) -> bool:
    """Every epoch done but no final evaluation of these weights (the run stopped during it):
    a resume then runs it, as the uninterrupted run would have."""
    if not (s.cfg.final_eval and state.epoch >= s.cfg.epochs):
        return False
    try:
        missing = json.loads((s.out / "eval.json").read_text()).get("step") != state.step
    except (OSError, ValueError, AttributeError):
        missing = True
    # rank 0 writes eval.json, and decides: a rank that sees no such file (a run folder not
    # shared) must not take the other branch, where the evaluation's collectives would wait for it
    return D.gather_host(missing, s.host_group)[0]


def nothing_left(cfg: TrainConfig, state: TrainState) -> str | None:
    """Why a resumed run has no step left to take, with the flag that would give it more."""
    if state.epoch >= cfg.epochs:
        return (f"has finished its --epochs {cfg.epochs} (step {state.step}); --epochs N trains on to N, "
                "--eval-only --checkpoint FILE evaluates")
    if steps_spent(cfg, state):
        return (f"is at step {state.step}, its --max-steps {cfg.max_steps}; continue with a larger "
                "--max-steps N, or --max-steps none")
    return None


def check_same_start(s: Session, state: TrainState) -> None:
    """Every rank starts from the same position: a rank that did not see the run's last.pt (no
    shared file system, a copy lagging behind) would otherwise train from scratch beside the
    others, silently. Compared over the host group; nothing to compare in one process."""
    where = D.gather_host((state.epoch, state.step, state.batch), s.host_group)
    if len(set(where)) > 1:
        starts = ", ".join(f"rank {r}: epoch {e + 1} step {st}" for r, (e, st, _) in enumerate(where))
        raise RunError(f"{s.out}: the ranks start from different places ({starts}); every rank must "
                       f"read the same {s.out / 'last.pt'} (a shared file system)")


def run_session(s: Session, state: TrainState, read: tuple[Path, os.stat_result] | None = None) -> int:
    """The run folder brought in line with ``state``, then the epochs under a signal handler.
    Rank 0 holds the folder's lock for the session: a second train.py on the same run (a job
    submitted twice, a requeue while the old job drains) would write the same last.pt and
    metrics.jsonl and remove the other's temp files. ``read``: the checkpoint a resume loaded
    and its stat then; if another process replaced it before the lock was ours, resuming from
    what was read would drop that process's last steps, so the resume is refused."""
    lock: list[int] = []

    def prepare() -> None:
        s.out.mkdir(parents=True, exist_ok=True)     # ENOTDIR/EACCES/EROFS: a one-line OSError
        try:
            lock.append(lock_folder(s.out / RUN_LOCK, s.say.line))
        except BlockingIOError as exc:
            who = f", {exc.who()}" if isinstance(exc, LockHeld) else ""
            raise RunError(f"{s.out}: another train.py is running this run (it holds {s.out / RUN_LOCK}{who}); "
                           "wait for it to end or stop it, then resume") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            s.say.line(f"train: {s.out / RUN_LOCK}: this file system cannot lock ({exc.strerror}); "
                       "make sure no other train.py runs this run")
        if read is not None and _stat_key(read[0]) != _stat_key(read[1]):
            raise RunError(f"{read[0]}: replaced since this process read it (another train.py was still "
                           "saving it): resume again")
        remove_stale_temps(s.out)
        if state.step == 0 or not (s.out / "config.json").exists():
            write_config(s)    # a resume's flags are written with its first checkpoint, as they describe it
        # metrics.jsonl = the checkpoint's history: no epoch twice, none the checkpoint lacks
        write_text(s.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in state.history))
    try:
        on_main(s, prepare)
        log = together(s, lambda: logs.RunLog.open(s.cfg, s.say, s.out, s.info.world, s.info.is_main, state.step))
        stop = StopFlag().install()       # from here on a signal means: finish the step, save, exit
        s.say.line(f"train: run folder {s.out}; {s.classes} classes; devices {', '.join(s.devices)}; "
                   f"world {s.info.world}")
        try:
            return fit(s, state, stop, log)
        finally:
            stop.restore()
            log.close()
    finally:
        for fd in lock:
            unlock_folder(fd)


def fit(s: Session, state: TrainState, stop: StopFlag, log: logs.RunLog) -> int:
    """The epochs: train -> validate -> schedule -> save, until --epochs, --max-steps or a stop."""
    cfg = s.cfg
    phases = Phases(cfg.profile, s.devices)
    trained = False                 # steps this session: a profile of none must not replace one
    try:
        while state.epoch < cfg.epochs and not steps_spent(cfg, state):
            reason, trained = train_epoch(s, state, stop, phases, log), True
            if reason == "stopped":
                return paused(s, state, f"{stop.name or 'stop'} received", stop.exit_code)
            if reason == "max_steps":          # mid-epoch: no validation, the epoch is not over
                paused(s, state, f"--max-steps {cfg.max_steps} reached", 0)
                if cfg.profile:
                    report_profile(s, phases)
                return 0                        # no final evaluation: the run is not over
            start = time.perf_counter()
            end_epoch(s, state, stop)
            log.epoch_ended(state.history[-1], state.step, time.perf_counter() - start, s.net, phases)
        if state.epoch < cfg.epochs:           # --max-steps reached exactly at an epoch's end
            continue_line(s, state, f"--max-steps {cfg.max_steps} reached")   # last.pt: end_epoch's
            if cfg.profile and trained:
                report_profile(s, phases)
            return 0                            # no final evaluation: the run is not over
        if cfg.profile and trained:
            report_profile(s, phases)
        finish(s, state, stop)
        return 0
    except Interrupted as exc:                # during a validation: the epoch's steps are kept
        if state.epoch >= cfg.epochs:         # the final evaluation: last.pt already holds every epoch
            s.say.line(f"train: {exc} during the final evaluation; {s.out / 'last.pt'} holds every epoch. "
                       f"Run the evaluation with:\n  python train.py --resume {s.out}")
            return stop.exit_code
        return paused(s, state, f"{exc} during validation (a resume validates first)", stop.exit_code)
    except (NonFiniteLoss, ckpt.NonFiniteState) as exc:
        print(f"error: {exc}; stopped without saving it ({last_finite(s.out)}); try a lower --lr", file=sys.stderr)
        return 3
    except RecordsError as exc:             # a bad record met mid-epoch: keep every step before it
        try:
            save_checkpoint(s, state)
        except ckpt.NonFiniteState as bad:
            print(f"error: {exc}; {bad}, not saved ({last_finite(s.out)})", file=sys.stderr)
            return 3
        print(f"error: {exc}\n  saved {s.out / 'last.pt'} after step {state.step}; once the records are "
              f"fixed, continue with: python train.py --resume {s.out}", file=sys.stderr)
        return 2


def steps_spent(cfg: TrainConfig, state: TrainState) -> bool:
    return cfg.max_steps is not None and state.step >= cfg.max_steps


def train_epoch(s: Session, state: TrainState, stop: StopFlag, phases: Phases, log: logs.RunLog) -> str:
    """The epoch's steps from state's position on (a resumed epoch skips its trained batches)."""
    cfg = s.cfg
    loader = together(s, lambda: s.data.train(state.epoch))   # a rank that cannot read its shards stops all
    batches = loader.iter_epoch(state.epoch, start=state.batch)    # resumed: nothing before is decoded
    plan = StepPlan(epoch_batches=min(len(loader), cfg.epoch_steps or len(loader)),
                    max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps)
    profiler = trace_profiler(cfg.profile and s.info.is_main and state.epoch == 0, s.out)
    step_log = log.epoch_steps(state, plan.epoch_batches, cfg.batch_size, lambda: s.optimizer.param_groups[0]["lr"])
    with s.say.bar(f"epoch {state.epoch + 1}/{cfg.epochs}", plan.epoch_batches, state.batch) as advance, profiler:
        def on_step(st: TrainState) -> None:
            advance(1, info=f"{st.sums.images / st.sums.seconds:.1f} img/s" if st.sums.seconds else "")
            step_log(st)
        hooks = StepHooks(prepare=lambda batch: to_device(batch, s.settings), precision=s.precision,
                          phases=phases, should_stop=stop_poll(s, stop), on_step=on_step, profiler=profiler,
                          agree=lambda status: D.max_over_ranks(status, s.host_group))
        return train_steps(s.model, s.optimizer, batches, state, plan, s.settings, hooks)


def stop_poll(s: Session, stop: StopFlag):
    """What the loop asks after each step: has a signal asked us to stop?

    One process: the flag itself, every step. Distributed: every rank must stop after the
    same step, which takes a collective: an all-reduce over the host group (gloo, CPU
    tensors: the host waits for the other ranks' hosts, never for the GPU), polled every
    ``check_every`` steps on a count every rank shares; a signal waits at most that many steps.
    """
    if not s.info.enabled:
        return lambda: bool(stop)
    every, calls = s.settings.check_every, [0]

    def poll() -> bool:
        calls[0] += 1
        return calls[0] % every == 0 and D.max_over_ranks(int(bool(stop)), s.host_group) > 0
    return poll


def end_epoch(s: Session, state: TrainState, stop: StopFlag | None = None) -> None:
    """Validate on the centre crop, step the lr schedule, save the checkpoint, then log the epoch."""
    val = validate(s, "center", stop)
    m = {"epoch": state.epoch + 1, "step": state.step, "lr": state.schedule.lr, **state.sums.metrics(state.batch),
         "val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"], "val_loss": val["loss"],
         "epoch_seconds": state.sums.seconds, "train_images": state.sums.images * s.info.world}
    skipped = f"  ({m['amp_skipped']} fp16 steps skipped by the loss scaler)" if m["amp_skipped"] else ""
    s.say.line(epoch_line(m, s.cfg.epochs) + skipped)
    is_best = val["top1_err"] < min((h["val_top1_err"] for h in state.history), default=float("inf"))
    if state.schedule.step(val["top1_err"]):   # the next step's lr_at puts it in the optimizer
        s.say.line(f"train: validation top-1 error stopped improving for {s.cfg.plateau_patience} epoch(s): "
                   f"lr divided by 10 -> {state.schedule.lr:.3g}")
    state.end_epoch(m)
    save_checkpoint(s, state, best=is_best)

    def append() -> None:                      # only after the checkpoint it describes is on disk
        try:
            append_line(s.out / "metrics.jsonl", json.dumps(m))
        except OSError as exc:   # a resume rewrites metrics.jsonl from the checkpoint's history
            raise RunError(f"{s.out / 'metrics.jsonl'}: cannot write ({exc.strerror or exc}); {s.out / 'last.pt'} "
                           f"holds epoch {state.epoch}, and --resume {s.out} restores this line") from None
    on_main(s, append)


def validate(s: Session, view: str, stop: StopFlag | None = None) -> dict:
    """Every rank evaluates its share of the val split, then the sums are added up. A bad record
    (or a loader that cannot be built) on any rank is raised on every rank before that
    all-reduce: a rank that left alone would leave the others waiting in it. Raised from
    ``end_epoch``, the RecordsError makes ``fit`` save the epoch's trained steps (on every rank
    together), so a resume after the fix only validates. A signal (``stop``) is Interrupted
    after the current batch, the same way."""
    start = time.perf_counter()

    def local_sums() -> dict:
        loader = s.data.val(view)
        with s.say.bar(f"  val {view}", loader.epoch_size) as advance:
            def on_batch(n: int) -> None:
                advance(n)
                if stop is not None:
                    stop.check()
            return evaluate(s.net, loader, s.settings, on_batch=on_batch)
    sums = together(s, local_sums)
    keys = ("images", "top1", "top5", "loss_sum")
    totals = D.all_reduce_sum([sums[k] for k in keys], s.devices[0])
    metrics = eval_metrics(dict(zip(keys, totals)))
    logs.validated(s.say, view, metrics["images"], time.perf_counter() - start)
    return metrics


def write_config(s: Session) -> None:
    """config.json: the run's flags (``--config`` takes it back) and what they resolved to."""
    write_json(s.out / "config.json", {**to_dict(s.cfg), "out": str(s.out), "devices": s.devices,
                                       "world": s.info.world, "classes": s.classes})


def save_checkpoint(s: Session, state: TrainState, best: bool = False) -> None:
    """last.pt (and best.pt) from the model, the optimiser and the TrainState, written by rank 0.
    Every rank raises the same error together, none is left waiting: NonFiniteState if any of
    those tensors is NaN/inf (checked on every rank before the gather; nothing is written),
    RunError if rank 0 cannot write (the previous last.pt intact)."""
    tensors = {"model": s.net.state_dict(), "optimizer": s.optimizer.state_dict()}
    # DDP keeps the replicas identical, so every rank's verdict is the same; agreeing anyway
    # costs one tiny host all-gather per save and never depends on it
    bad = D.first_error(ckpt.finite_or_error(tensors), s.host_group)
    if bad is not None:
        raise bad
    state.rng = D.gather_host(ckpt.rng_state(), s.host_group)  # every rank joins; rank 0 writes
    last = s.out / "last.pt"

    def write() -> None:
        try:
            ckpt.save(last, {**tensors, "config": to_dict(s.cfg), "precision": s.precision.state_dict(),
                             **state.state_dict()})
            if best:
                ckpt.link(last, s.out / "best.pt")
        except OSError as exc:       # ENOSPC, EROFS, EDQUOT ...: the temp file is gone, last.pt untouched
            raise RunError(f"{last}: cannot write the checkpoint ({exc.strerror or exc}); "
                           f"the previous one is intact: {last_finite(s.out)}; once there is room, "
                           f"continue with python train.py --resume {s.out}") from None
        try:
            write_config(s)          # the flags of what last.pt holds, written after it
        except OSError as exc:
            raise RunError(f"{s.out / 'config.json'}: cannot write ({exc.strerror or exc}); {last} is saved: "
                           f"once there is room, continue with python train.py --resume {s.out}") from None
    on_main(s, write)


def together(s: Session, make: Callable[[], T]) -> T:
    """``make()`` on every rank, then every rank learns how it went everywhere: a UserError or
    OSError on any rank is raised on every rank (the lowest rank's), so no rank goes on into a
    collective that another has left. One host all-gather; ``make()`` alone in one process."""
    result, failure = None, None
    try:
        result = make()
    except (UserError, OSError) as exc:
        failure = exc
    failure = D.first_error(failure, s.host_group)
    if failure is not None:
        raise failure
    return result


def on_main(s: Session, write: Callable[[], None]) -> None:
    """``write`` on rank 0 only (only rank 0 writes files), with ``together``'s agreement; the
    all-gather also holds every rank until the write is done."""
    together(s, lambda: write() if s.info.is_main else None)


def last_finite(out: Path) -> str:
    """Which checkpoint of the run folder a user can go back to (checked, not assumed)."""
    for name in ("last.pt", "best.pt"):
        try:
            state = ckpt.load(out / name, keys=("model", "optimizer"))
        except ckpt.CheckpointError:
            continue
        if not ckpt.nonfinite_tensor({"model": state["model"], "optimizer": state["optimizer"]}):
            return f"the last finite checkpoint is {out / name} (step {state['step']})"
    return f"no finite checkpoint in {out}"


def paused(s: Session, state: TrainState, why: str, status: int) -> int:
    """Save mid-epoch and say how to continue with exactly the next batch."""
    save_checkpoint(s, state)
    continue_line(s, state, why)
    return status


def continue_line(s: Session, state: TrainState, why: str) -> None:
    more = " --max-steps N (a larger N, or none)" if why.startswith("--max-steps") else ""
    s.say.line(f"train: {why}: saved {s.out / 'last.pt'} after step {state.step} (epoch {state.epoch + 1}, "
               f"batch {state.batch}). Continue exactly with:\n  python train.py --resume {s.out}{more}")


def finish(s: Session, state: TrainState, stop: StopFlag | None = None) -> None:
    """End of training: the per-epoch table, then single-crop vs 10-crop error on the final weights."""
    if state.history:
        s.say.table(epochs_table(state.history))
    if not s.cfg.final_eval:
        return
    write_eval(s, s.out / "eval.json", {"epoch": state.epoch, "step": state.step}, stop)
    s.say.line(f"train: done; run folder {s.out} (config.json, metrics.jsonl, last.pt, best.pt, eval.json)")
    if s.cfg.demo:
        s.say.line(REAL_THING)


def write_eval(s: Session, path: Path, where: dict, stop: StopFlag | None = None) -> None:
    single, ten = validate(s, "center", stop), validate(s, "tencrop", stop)
    s.say.table(crops_table(single, ten, s.classes))
    on_main(s, lambda: write_json(path, {**where, "center": single, "tencrop": ten}))


def report_profile(s: Session, phases: Phases) -> None:
    summary = phases.summary()
    s.say.table(profile_table(summary, s.devices))
    on_main(s, lambda: write_json(s.out / "profile.json",
                                  {**summary, "devices": s.devices, "trace": str(s.out / "trace.json")}))
    s.say.line(f"train: profile in {s.out / 'profile.json'}, Chrome trace in {s.out / 'trace.json'}")


# --- evaluation only --------------------------------------------------------------------

def eval_only(cfg: TrainConfig, info: D.DistInfo, say: Reporter) -> int:
    """--eval-only --checkpoint PATH: single-crop and 10-crop error of a checkpoint's weights,
    written to eval-<checkpoint name>.json in --out (default: beside the checkpoint). The model switches come
    from the checkpoint's own config, and so do the records unless --records is given."""
    path = Path(cfg.checkpoint)
    if path.is_dir():                    # a run folder, as figures, export and predict take
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    state = ckpt.load(path)
    saved = saved_config(state, path)
    cfg = replace(cfg, **{k: getattr(saved, k) for k in MODEL_FIELDS})
    if cfg.records is None and saved.records:      # the records it trained on, as figures/export/predict
        cfg = replace(cfg, records=saved.records)
    out = run_folder(replace(cfg, out=cfg.out or str(path.parent)))
    s = build_session(cfg, info, say, out)
    try:
        s.net.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ckpt.CheckpointError(f"{path}: its weights do not fit this model ({first})") from None
    out.mkdir(parents=True, exist_ok=True)
    # eval-<checkpoint>.json, not eval.json: beside a run's checkpoints that is the run's own final
    # evaluation (of last.pt), which a resumed run checks to know whether it still has to run it
    target = out / f"eval-{path.stem}.json"
    write_eval(s, target, {"checkpoint": str(path), "epoch": state["epoch"], "step": state["step"]})
    say.line(f"train: evaluated {path} (epoch {state['epoch']}, step {state['step']}); wrote {target}")
    return 0
