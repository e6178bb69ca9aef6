"""The run folder: its lock, config.json, metrics.jsonl, checkpoints and the lines that say how
to continue a stopped run.

Only rank 0 writes here; every write is agreed by every rank (``distributed.write_on_rank0``),
so a write that fails on rank 0 stops all ranks with the same line. Writes are atomic
(common.atomic): last.pt is always the previous complete checkpoint or the new one.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from common.atomic import LockHeld, append_line, lock_folder, unlock_folder, write_json, write_text
from common.config import to_dict

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig
from .loop import NonFiniteLoss
from .session import RunError, Session
from .signals import Interrupted, StopFlag
from .state import TrainState

RUN_LOCK = ".train.lock"          # in the run folder; flock'ed by the rank-0 process training it


def run_folder(cfg: TrainConfig) -> Path:
    """The run folder (created later, by its first write); an existing file there is a one-line error."""
    out = Path(cfg.out) if cfg.out else Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder; pick another --out")
    return out


def _stat_key(what: Path | os.stat_result) -> tuple:
    st = what if isinstance(what, os.stat_result) else os.stat(what)
    return st.st_ino, st.st_size, st.st_mtime_ns


def remove_stale_temps(out: Path) -> None:
    """Temp files of writes a kill interrupted (common.atomic names them .NAME.*.tmp)."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def open_run_folder(session: Session, state: TrainState, read: tuple[Path, os.stat_result] | None) -> list[int]:
    """The run folder brought in line with ``state``, on rank 0; returns the lock's file
    descriptors to release at the end (``unlock_folder``; none on other ranks).

    Rank 0 holds the folder's lock for the session: a second train.py on the same run (a job
    submitted twice, a requeue while the old job drains) would write the same last.pt and
    metrics.jsonl and remove the other's temp files. ``read``: the checkpoint a resume loaded
    and its stat then; if another process replaced it before the lock was ours, resuming from
    what was read would drop that process's last steps, so the resume is refused."""
    out, lock = session.out, []

    def prepare() -> None:
        out.mkdir(parents=True, exist_ok=True)     # ENOTDIR/EACCES/EROFS: a one-line OSError
        try:
            lock.append(lock_folder(out / RUN_LOCK, session.say.line))
        except BlockingIOError as exc:
            who = f", {exc.who()}" if isinstance(exc, LockHeld) else ""
            raise RunError(f"{out}: another train.py is running this run (it holds {out / RUN_LOCK}{who}); "
                           "wait for it to end or stop it, then resume") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            session.say.line(f"train: {out / RUN_LOCK}: this file system cannot lock ({exc.strerror}); "
                             "make sure no other train.py runs this run")
        if read is not None and _stat_key(read[0]) != _stat_key(read[1]):
            raise RunError(f"{read[0]}: replaced since this process read it (another train.py was still "
                           "saving it): resume again")
        remove_stale_temps(out)
        if state.step == 0 or not (out / "config.json").exists():
            write_config(session)    # a resume's flags are written with its first checkpoint, as they describe it
        # metrics.jsonl = the checkpoint's history: no epoch twice, none the checkpoint lacks
        write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in state.history))
    try:
        distributed.write_on_rank0(prepare, session.info, session.host_group)
    except BaseException:
        for fd in lock:
            unlock_folder(fd)
        raise
    return lock


def write_config(session: Session) -> None:
    """config.json: the run's flags (``--config`` takes it back) and what they resolved to."""
    write_json(session.out / "config.json", {**to_dict(session.cfg), "out": str(session.out),
                                             "devices": session.devices, "world": session.info.world,
                                             "classes": session.classes})


def append_metrics(session: Session, state: TrainState, metrics: dict) -> None:
    """One metrics.jsonl line, only after the checkpoint it describes is on disk."""
    out = session.out

    def append() -> None:
        try:
            append_line(out / "metrics.jsonl", json.dumps(metrics))
        except OSError as exc:   # a resume rewrites metrics.jsonl from the checkpoint's history
            raise RunError(f"{out / 'metrics.jsonl'}: cannot write ({exc.strerror or exc}); {out / 'last.pt'} "
                           f"holds epoch {state.epoch}, and --resume {out} restores this line") from None
    distributed.write_on_rank0(append, session.info, session.host_group)


def save_checkpoint(session: Session, state: TrainState, best: bool = False) -> None:
    """last.pt (and best.pt) from the model, the optimiser and the TrainState, written by rank 0.
    Every rank raises the same error together, none is left waiting: NonFiniteState if any of
    those tensors is NaN/inf (checked on every rank before the gather; nothing is written),
    RunError if rank 0 cannot write (the previous last.pt intact)."""
    out, group = session.out, session.host_group
    tensors = {"model": session.net.state_dict(), "optimizer": session.optimizer.state_dict()}
    # DDP keeps the replicas identical, so every rank's verdict is the same; agreeing anyway
    # costs one tiny host all-gather per save and never depends on it
    bad = distributed.first_error(ckpt.finite_or_error(tensors), group)
    if bad is not None:
        raise bad
    state.rng = distributed.gather_host(ckpt.rng_state(), group)  # every rank joins; rank 0 writes
    last = out / "last.pt"

    def write() -> None:
        try:
            ckpt.save(last, {**tensors, "config": to_dict(session.cfg), "precision": session.precision.state_dict(),
                             **state.state_dict()})
            if best:
                ckpt.link(last, out / "best.pt")
        except OSError as exc:       # ENOSPC, EROFS, EDQUOT ...: the temp file is gone, last.pt untouched
            raise RunError(f"{last}: cannot write the checkpoint ({exc.strerror or exc}); "
                           f"the previous one is intact: {last_finite(out)}; once there is room, "
                           f"continue with python train.py --resume {out}") from None
        try:
            write_config(session)          # the flags of what last.pt holds, written after it
        except OSError as exc:
            raise RunError(f"{out / 'config.json'}: cannot write ({exc.strerror or exc}); {last} is saved: "
                           f"once there is room, continue with python train.py --resume {out}") from None
    distributed.write_on_rank0(write, session.info, group)


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


def save_resumable(session: Session, state: TrainState, why: str, status: int) -> int:
    """Save mid-epoch and say how to continue with exactly the next batch; returns ``status``."""
    save_checkpoint(session, state)
    continue_line(session, state, why)
    return status


def continue_line(session: Session, state: TrainState, why: str) -> None:
    more = " --max-steps N (a larger N, or none)" if why.startswith("--max-steps") else ""
    session.say.line(f"train: {why}: saved {session.out / 'last.pt'} after step {state.step} (epoch "
                     f"{state.epoch + 1}, batch {state.batch}). Continue exactly with:\n"
                     f"  python train.py --resume {session.out}{more}")


def fault_exit(session: Session, state: TrainState, exc: Exception, stop: StopFlag, first_step: int) -> int:
    """The line and exit status of a run a fault stopped: a signal during a validation or the
    final evaluation (the epoch's steps kept), a NaN/inf loss or weights (nothing non-finite
    saved, status 3), a bad record met mid-epoch (every step before it saved, status 2).
    ``first_step``: the step this process started at; a bad record met before any step of its
    own saves nothing (a new run would write a checkpoint of untrained weights, a resumed one
    the checkpoint it was started from)."""
    out = session.out
    if isinstance(exc, Interrupted):
        if state.epoch >= session.cfg.epochs:   # the final evaluation: last.pt already holds every epoch
            session.say.line(f"train: {exc} during the final evaluation; {out / 'last.pt'} holds every epoch. "
                             f"Run the evaluation with:\n  python train.py --resume {out}")
            return stop.exit_code
        return save_resumable(session, state, f"{exc} during validation (a resume validates first)", stop.exit_code)
    if isinstance(exc, (NonFiniteLoss, ckpt.NonFiniteState)):
        print(f"error: {exc}; stopped without saving it ({last_finite(out)}); try a lower --lr", file=sys.stderr)
        return 3
    if state.step == first_step:                # a RecordsError before any step: nothing to keep
        kept = (f"{out / 'last.pt'} (step {state.step}) is as it was" if state.step
                else "no checkpoint written")
        print(f"error: {exc}\n  nothing trained; {kept}; once the records are fixed, run the same "
              f"command again", file=sys.stderr)
        return 2
    try:                                        # a RecordsError: keep every step before it
        save_checkpoint(session, state)
    except ckpt.NonFiniteState as bad:
        print(f"error: {exc}; {bad}, not saved ({last_finite(out)})", file=sys.stderr)
        return 3
    print(f"error: {exc}\n  saved {out / 'last.pt'} after step {state.step}; once the records are "
          f"fixed, continue with: python train.py --resume {out}", file=sys.stderr)
    return 2
