"""A training run from start to end: setup, then ``for epoch: train -> validate -> schedule -> save``.

``main(argv)`` is what train.py calls. The pieces live by job: the session (devices, net,
loaders) in engine/session.py, resume in engine/resume.py, the run folder (lock, config,
checkpoints, stop lines) in engine/runfolder.py, validation and the final evaluation in
engine/evaluation.py, the step loop in engine/loop.py; this module decides the order.
Exit status: 0 done (or stopped by --max-steps, resumable), 2 bad input or OS problem (one
``error:`` line; the last good checkpoint intact), 3 NaN/inf loss or weights (nothing
non-finite saved), 4 another rank of a torchrun run vanished (killed, crashed, its node lost:
one line naming it; nothing saved, the run continues from its last checkpoint with --resume or
--auto-resume), 128+signal after SIGINT/SIGTERM (checkpoint saved, resumable). Under torchrun
every rank stops with the same status: a fault one rank meets (a bad record, a write only rank 0
does) is agreed on before the next collective, so no rank is left waiting in it.
"""
from __future__ import annotations

import signal
import sys
import time

from common.atomic import unlock_folder
from common.errors import UserError, error_line
from records.format import RecordsError

from . import checkpoint as ckpt
from . import distributed, logs
from .config import TrainConfig, parse_command
from .evaluation import end_epoch, eval_only, final_evaluation, report_profile
from .loop import NonFiniteLoss, StepHooks, StepPlan, train_steps
from .profiling import Phases, trace_profiler
from .report import Reporter
from .resume import final_eval_missing, find_resume, nothing_left, resume_into
from .runfolder import continue_line, fault_exit, open_run_folder, run_folder, save_resumable
from .session import RunError, Session, build_session, new_state
from .signals import Interrupted, StopFlag
from .state import TrainState


def main(argv: list[str] | None = None) -> int:
    return run(*parse_command(sys.argv[1:] if argv is None else list(argv)))


def run(cfg: TrainConfig, given: frozenset[str]) -> int:
    """The run ``parse_command`` parsed: ``given`` names the flags typed (a resume puts those on top)."""
    info = distributed.dist_info_from_env()
    say = Reporter(info.is_main, cfg.progress)
    try:
        if cfg.eval_only:
            return eval_only(cfg, info, say)
        return train(cfg, given, info, say)
    except (UserError, OSError) as exc:   # OSError: disk full, read-only, a file where a folder should be ...
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:           # a collective whose peer rank is gone, before training
        if not distributed.peer_lost(exc, info):
            raise
        print(distributed.peer_lost_line(info, cfg.resume or cfg.out), file=sys.stderr)
        return distributed.PEER_LOST_STATUS
    except KeyboardInterrupt:             # Ctrl-C at once (a second one, or one before training): no traceback
        print("train: interrupted; checkpoints on disk are whole (written atomically): a run that has "
              "one continues with python train.py --resume RUN", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        distributed.shutdown(info)


def train(cfg: TrainConfig, given: frozenset[str], info: distributed.DistInfo, say: Reporter) -> int:
    cfg, resume = find_resume(cfg, given, say)
    out = run_folder(cfg)
    if cfg.tensorboard and not logs.tensorboard_available():     # before any device or file is touched
        raise RunError(logs.TENSORBOARD_MISSING)
    session = build_session(cfg, info, say, out)
    state = new_state(cfg, info.world)
    resume_into(session, state, resume)
    if resume is not None and (why := nothing_left(cfg, state)) and not final_eval_missing(session, state):
        # a resumed run with nothing to train says so and touches nothing: no "done", no new
        # evaluation, no profile of zero steps over the one it measured
        say.line(f"train: {session.out} {why}; nothing to train")
        return 0
    return run_session(session, state, resume.read if resume else None)


def run_session(session: Session, state: TrainState, read=None) -> int:
    """The run folder brought in line with ``state`` and locked (``open_run_folder``; ``read``:
    the checkpoint a resume loaded and its stat then), then the epochs under a signal handler."""
    lock = open_run_folder(session, state, read)
    try:
        log = distributed.fail_together(lambda: logs.RunLog.open(
            session.cfg, session.say, session.out, session.info.world, session.info.is_main, state.step),
            session.host_group)
        stop = StopFlag().install()       # from here on a signal means: finish the step, save, exit
        session.say.line(f"train: run folder {session.out}; {session.classes} classes; devices "
                         f"{', '.join(session.devices)}; world {session.info.world}")
        try:
            return fit(session, state, stop, log)
        except RuntimeError as exc:
            if not distributed.peer_lost(exc, session.info):
                raise
            print(distributed.peer_lost_line(session.info, session.out, state.step), file=sys.stderr)
            return distributed.PEER_LOST_STATUS
        finally:
            stop.restore()
            log.close()
    finally:
        for fd in lock:
            unlock_folder(fd)


def fit(session: Session, state: TrainState, stop: StopFlag, log: logs.RunLog) -> int:
    """The epochs: train -> validate -> schedule -> save, until --epochs, --max-steps or a stop."""
    cfg, first_step = session.cfg, state.step
    phases = Phases(cfg.profile, session.devices, cfg.profile_warmup, cfg.profile_window)

    def profile() -> None:               # a profile of no steps must not replace one
        if cfg.profile and state.step > first_step:
            report_profile(session, phases, state.step)
    try:
        while state.epoch < cfg.epochs and not state.max_steps_reached(cfg.max_steps):
            reason = train_epoch(session, state, stop, phases, log)
            if reason == "stopped":
                return save_resumable(session, state, f"{stop.name or 'stop'} received", stop.exit_code)
            if reason == "max_steps":          # mid-epoch: no validation, the epoch is not over
                save_resumable(session, state, f"--max-steps {cfg.max_steps} reached", 0)
                profile()
                return 0                        # no final evaluation: the run is not over
            start = time.perf_counter()
            end_epoch(session, state, stop)
            log.epoch_ended(state.history[-1], state.step, time.perf_counter() - start, session.net, phases)
        if state.epoch < cfg.epochs:           # --max-steps reached exactly at an epoch's end
            continue_line(session, state, f"--max-steps {cfg.max_steps} reached")   # last.pt: end_epoch's
            profile()
            return 0                            # no final evaluation: the run is not over
        profile()
        final_evaluation(session, state, stop)
        return 0
    except (Interrupted, NonFiniteLoss, ckpt.NonFiniteState, RecordsError) as exc:
        return fault_exit(session, state, exc, stop, first_step)


def train_epoch(session: Session, state: TrainState, stop: StopFlag, phases: Phases, log: logs.RunLog) -> str:
    """The epoch's steps from state's position on (a resumed epoch skips its trained batches)."""
    cfg, group = session.cfg, session.host_group
    loader = distributed.fail_together(lambda: session.data.train(state.epoch), group)  # a rank that cannot read its shards stops all
    batches = loader.iter_epoch(state.epoch, start=state.batch)    # resumed: nothing before is decoded
    plan = StepPlan(epoch_batches=min(len(loader), cfg.epoch_steps or len(loader)),
                    max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps)
    profiler = trace_profiler(cfg.profile and session.info.is_main and state.epoch == 0, session.out)
    step_log = log.epoch_steps(state, plan.epoch_batches, cfg.batch_size, lambda: session.optimizer.param_groups[0]["lr"])
    stop_requested = stop_poll(session, stop)
    with session.say.bar(f"epoch {state.epoch + 1}/{cfg.epochs}", plan.epoch_batches, state.batch) as show, profiler:
        def after_step(st: TrainState) -> bool:
            profiler.step()
            show(completed=st.batch, info=f"{st.sums.images / st.sums.seconds:.1f} img/s" if st.sums.seconds else "")
            step_log(st)
            return stop_requested(st.step)
        hooks = StepHooks(precision=session.precision, phases=phases, after_step=after_step,
                          agree=lambda status: distributed.max_over_ranks(status, group))
        return train_steps(session.model, session.optimizer, batches, state, plan, session.settings, hooks)


def stop_poll(session: Session, stop: StopFlag):
    """What the loop asks after each step (given the run's step): has a signal asked us to stop?

    One process: the flag itself, every step. Distributed: every rank must stop after the
    same step, which takes a collective: an all-reduce over the host group (gloo, CPU
    tensors: the host waits for the other ranks' hosts, never for the GPU), polled every
    ``check_every`` steps of the step counter every rank shares; a signal waits at most that
    many steps.
    """
    if not session.info.enabled:
        return lambda step: bool(stop)
    every = session.settings.check_every
    return lambda step: step % every == 0 and distributed.max_over_ranks(int(bool(stop)), session.host_group) > 0
