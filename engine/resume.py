"""Resume: continue a run from its checkpoint exactly where it left off.

``find_resume`` reads the checkpoint --resume or --auto-resume names and merges the flags
given now on top of its saved config; ``restore`` puts the weights, momentum, TrainState
(the schedule with it), loss scale and RNG states back, checked against this run's layout;
the checks after it refuse what would make the continuation something other than the rest
of the run begun (other records, ranks that start from different places).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common.config import from_dict
from records.folder import read_meta

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig, merge_explicit
from .recipe import set_hyperparameters
from .report import Reporter
from .session import RunError, Session
from .state import KEYS, TrainState

RESUME_KEYS = ("model", "optimizer", "config", *KEYS)


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from."""
    path: Path
    saved: dict                                  # its RESUME_KEYS
    lr_given: bool                               # --lr overrides the saved schedule's lr
    read: tuple[Path, os.stat_result] | None     # the file and its stat when read (None: not a plain file)


def resume_paths(resume: str) -> tuple[Path, Path]:
    """--resume RUN_DIR or --resume RUN_DIR/last.pt (any checkpoint file): (checkpoint, run folder)."""
    path = Path(resume)
    return (path / "last.pt", path) if path.is_dir() else (path, path.parent)


def saved_config(state: dict, path: Path) -> TrainConfig:
    try:
        return from_dict(TrainConfig, state["config"])
    except (ValueError, TypeError) as exc:       # ConfigError is a ValueError
        raise ckpt.CheckpointError(f"{path}: its saved config is not valid here: {exc}") from None


def find_resume(cfg: TrainConfig, given: frozenset[str], say: Reporter) -> tuple[TrainConfig, Resume | None]:
    """(the run's config, the checkpoint it continues from or None for a new run). A resumed
    run's config is its saved one with the flags given now on top."""
    continuing = cfg.auto_resume and (Path(cfg.out) / "last.pt").exists()
    if not (cfg.resume or continuing):
        if cfg.out and (Path(cfg.out) / "last.pt").exists():
            raise RunError(f"{cfg.out}: already holds a run (last.pt); continue it with --resume {cfg.out} "
                           "(or start runs with --auto-resume) or pick another --out")
        return cfg, None
    path, out = resume_paths(cfg.resume or cfg.out)
    if cfg.resume and cfg.out and Path(cfg.out).resolve() != out.resolve():
        raise RunError(f"--out {cfg.out}: a resumed run continues in its own folder ({out}); to branch it, "
                       f"copy that folder and resume the copy")
    read = (path, os.stat(path)) if path.is_file() else None    # before the load: see open_run_folder
    saved = ckpt.load(path, keys=RESUME_KEYS)
    merged, saved_cfg = resume_config(cfg, given, path, saved, say)
    # --resume: an explicit --lr always wins. --auto-resume reruns the command that started
    # the run, so its --lr is an override only when it differs from the saved one (else every
    # restart would undo the plateau schedule's lr drops).
    lr_given = merged.lr != saved_cfg.lr if continuing else "lr" in given
    return replace(merged, out=str(out)), Resume(path, saved, lr_given, read)


def resume_config(cfg: TrainConfig, given: frozenset[str], path: Path, state: dict,
                  say: Reporter) -> tuple[TrainConfig, TrainConfig]:
    """(the saved config with the flags given now on top, the saved config); the saved GPU
    layout only if it fits."""
    saved = saved_config(state, path)
    cfg, changes = merge_explicit(saved, cfg, given)
    if "gpus" not in given:
        ids, visible = cfg.gpu_ids() or [], torch.cuda.device_count()
        if any(i >= visible for i in ids):
            raise RunError(f"{path}: saved with --gpus {cfg.gpus!r}, but {visible} GPU(s) are visible here; "
                           "pass --gpus to choose this machine's layout (weights, momentum and schedule carry over)")
    say.line(f"train: resuming {path} at epoch {state['epoch'] + 1}, batch {state['batch']}, step {state['step']}"
             + (f" (overriding: {'; '.join(changes)})" if changes else ""))
    return cfg, saved


def restore(session: Session, state: TrainState, saved: dict, path: Path, lr_given: bool) -> None:
    """Weights, momentum, TrainState and RNG from a checkpoint, checked against this run's layout."""
    if ckpt.nonfinite_tensor({"model": saved["model"], "optimizer": saved["optimizer"]}):
        raise ckpt.CheckpointError(f"{path}: holds NaN/inf weights or momentum; resume from an earlier checkpoint")
    cfg, world, say = session.cfg, session.info.world, session.say
    check_classes(saved["model"], session, path)
    try:
        session.net.load_state_dict(saved["model"])
        session.optimizer.load_state_dict(saved["optimizer"])
        set_hyperparameters(session.optimizer, cfg)     # the resumed run's flags, not the saved ones
        state.load_state_dict(saved)
        session.precision.load_state_dict(saved.get("precision") or {})   # fp16: the loss scale goes on
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ckpt.CheckpointError(f"{path}: does not fit this model or run ({first})") from None
    then = state.continue_as(cfg.seed, cfg.batch_size, world)
    if then is not None:
        raise RunError(f"{path}: saved mid-epoch (epoch {state.epoch + 1}, batch {state.batch}) with --batch-size "
                       f"{then[1]} x {then[2]} rank(s), --seed {then[0]}; resume with those (now {cfg.batch_size} "
                       f"x {world}, --seed {cfg.seed}) or from a checkpoint at an epoch's end")
    state.schedule.retune(cfg.plateau_patience, cfg.plateau_threshold, cfg.max_lr_drops,
                          lr=cfg.lr if lr_given else None)
    if len(state.rng) == world:
        note = ckpt.set_rng_state(state.rng[session.info.rank])
        if note:
            say.line(f"train: {note}: those GPUs' dropout RNG reseeded, the continuation is not bitwise identical")
    else:
        say.line(f"train: world size changed ({len(state.rng)} -> {world}): dropout RNG reseeded, "
                 "so the continuation is not bitwise identical")


def check_classes(weights: dict, session: Session, path: Path) -> None:
    """A checkpoint whose net has another number of outputs (fc8's rows) than these records have
    classes: said with both counts, before load_state_dict's size-mismatch report."""
    fc8 = weights.get("fc8.weight")
    if fc8 is not None and getattr(fc8, "ndim", 0) == 2 and fc8.shape[0] != session.classes:
        records = session.cfg.records or "these records"
        raise RunError(f"{path}: trained on {fc8.shape[0]} classes, but {records} holds {session.classes}; "
                       "resume with the records it was trained on (--records DIR), or start a new run on these")


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


def resume_into(session: Session, state: TrainState, resume: Resume | None) -> None:
    """``state`` at the checkpoint's position (a new run: at the start), noting the records it
    reads, and every rank at the same one."""
    reads = records_signature(session.data.records)
    if resume is not None:
        restore(session, state, resume.saved, resume.path, lr_given=resume.lr_given)
        distributed.fail_together(   # node-local copies of the records may differ
            lambda: check_records(state, reads, resume.path, session.data.records, session.say), session.host_group)
    state.records = reads
    check_same_start(session, state)


def final_eval_missing(session: Session, state: TrainState) -> bool:
    """Every epoch done but no final evaluation of these weights (the run stopped during it):
    a resume then runs it, as the uninterrupted run would have."""
    if not (session.cfg.final_eval and state.epoch >= session.cfg.epochs):
        return False
    try:
        missing = json.loads((session.out / "eval.json").read_text()).get("step") != state.step
    except (OSError, ValueError, AttributeError):
        missing = True
    # rank 0 writes eval.json, and decides: a rank that sees no such file (a run folder not
    # shared) must not take the other branch, where the evaluation's collectives would wait for it
    return distributed.gather_host(missing, session.host_group)[0]


def nothing_left(cfg: TrainConfig, state: TrainState) -> str | None:
    """Why a resumed run has no step left to take, with the flag that would give it more."""
    if state.epoch >= cfg.epochs:
        return (f"has finished its --epochs {cfg.epochs} (step {state.step}); --epochs N trains on to N, "
                "--eval-only --checkpoint FILE evaluates")
    if state.max_steps_reached(cfg.max_steps):
        return (f"is at step {state.step}, its --max-steps {cfg.max_steps}; continue with a larger "
                "--max-steps N, or --max-steps none")
    return None


def check_same_start(session: Session, state: TrainState) -> None:
    """Every rank starts from the same position: a rank that did not see the run's last.pt (no
    shared file system, a copy lagging behind) would otherwise train from scratch beside the
    others, silently. Compared over the host group; nothing to compare in one process."""
    where = distributed.gather_host((state.epoch, state.step, state.batch), session.host_group)
    if len(set(where)) > 1:
        starts = ", ".join(f"rank {r}: epoch {e + 1} step {st}" for r, (e, st, _) in enumerate(where))
        raise RunError(f"{session.out}: the ranks start from different places ({starts}); every rank must "
                       f"read the same {session.out / 'last.pt'} (a shared file system)")
