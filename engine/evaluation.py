"""Evaluation: the validation pass that ends every epoch, the final single-crop vs 10-crop
evaluation, and ``--eval-only`` on a checkpoint.

Every rank evaluates its own share of the val split; the sums are added up over the ranks
(``distributed.all_reduce_sum``), then turned into error rates.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from common.atomic import write_json
from records.folder import read_meta
from records.format import DEFAULT_RECORDS, DEFAULT_SAMPLE, RecordsError

from . import checkpoint as ckpt
from . import distributed, logs
from .config import MODEL_FIELDS, TrainConfig
from .loop import eval_metrics, evaluate, model_rate
from .profiling import Phases
from .report import Reporter, crops_table, epoch_line, epochs_table, profile_table
from .resume import check_classes, saved_config
from .runfolder import append_metrics, run_folder, save_checkpoint
from .session import Session, build_session
from .signals import StopFlag
from .state import TrainState

# The demo's closing lines: only after a run on the built-in sample set (whose next step is ImageNet).
REAL_THING = ("The real thing, on ImageNet with two GPUs:\n"
              "  python prep/build_records.py --source /data/imagenet --out /data/records\n"
              "  python train.py --gpus 0,1 --records /data/records --out runs/alexnet")


def validate(session: Session, view: str, stop: StopFlag | None = None) -> dict:
    """Every rank evaluates its share of the val split, then the sums are added up. A bad record
    (or a loader that cannot be built) on any rank is raised on every rank before that
    all-reduce: a rank that left alone would leave the others waiting in it. Raised from
    ``end_epoch``, the RecordsError makes ``fit`` save the epoch's trained steps (on every rank
    together), so a resume after the fix only validates. A signal (``stop``) is Interrupted
    after the current batch, the same way."""
    start = time.perf_counter()

    def local_sums() -> dict:
        loader = session.data.val(view)
        plain = logs.PassProgress(session.say, view, loader.epoch_size)
        with session.say.bar(f"  val {view}", loader.epoch_size) as advance:
            def on_batch(n: int) -> None:
                advance(n)
                plain(n)
                if stop is not None:
                    stop.check()
            return evaluate(session.net, loader, session.settings, on_batch=on_batch)
    sums = distributed.fail_together(local_sums, session.host_group)
    keys = ("images", "top1", "top5", "loss_sum")
    totals = distributed.all_reduce_sum([sums[k] for k in keys], session.devices[0])
    metrics = eval_metrics(dict(zip(keys, totals)))
    logs.validated(session.say, view, metrics["images"], time.perf_counter() - start)
    return metrics


def end_epoch(session: Session, state: TrainState, stop: StopFlag | None = None) -> None:
    """Validate on the centre crop, step the lr schedule, save the checkpoint, then log the epoch."""
    cfg, say = session.cfg, session.say
    val = validate(session, "center", stop)
    m = {"epoch": state.epoch + 1, "step": state.step, "lr": state.schedule.lr, **state.sums.metrics(state.batch),
         "val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"], "val_loss": val["loss"],
         "epoch_seconds": state.sums.seconds, "train_images": state.sums.images * session.info.world}
    skipped = f"  ({m['amp_skipped']} fp16 steps skipped by the loss scaler)" if m["amp_skipped"] else ""
    say.line(epoch_line(m, cfg.epochs) + skipped)
    is_best = val["top1_err"] < min((h["val_top1_err"] for h in state.history), default=float("inf"))
    if state.schedule.step(val["top1_err"]):   # the next step's lr_at puts it in the optimizer
        say.line(f"train: validation top-1 error stopped improving for {cfg.plateau_patience} epoch(s): "
                 f"lr divided by 10 -> {state.schedule.lr:.3g}")
    state.end_epoch(m)
    save_checkpoint(session, state, best=is_best and not cfg.keep_last_only)
    append_metrics(session, state, m)


def write_eval(session: Session, path: Path, where: dict, stop: StopFlag | None = None, what: str = "") -> None:
    single, ten = validate(session, "center", stop), validate(session, "tencrop", stop)
    session.say.table(crops_table(single, ten, session.classes, what))
    distributed.write_on_rank0(lambda: write_json(path, {**where, "center": single, "tencrop": ten}),
                               session.info, session.host_group)


def best_weights(session: Session, state: TrainState) -> dict:
    """Put best.pt's weights into the net (on every rank), unless the last epoch is the best and
    the net holds them already; returns where they come from, for the table and eval.json. The
    final table evaluates what figures, export and predict use: the epoch with the lowest
    validation top-1 error (the first of equals: best.pt is replaced only by a strict improvement)."""
    if not state.history or session.cfg.keep_last_only:
        return {"checkpoint": "last.pt", "best_epoch": None}
    errors = [m["val_top1_err"] for m in state.history]
    best = state.history[errors.index(min(errors))]["epoch"]
    if best != state.history[-1]["epoch"]:
        path = session.out / "best.pt"

        def load() -> None:
            saved = ckpt.load(path, keys=("model", "epoch"))
            if saved["epoch"] != best:
                raise ckpt.CheckpointError(f"{path}: holds epoch {saved['epoch']}, but the run's best is epoch "
                                           f"{best}; --eval-only --checkpoint FILE evaluates a checkpoint of choice")
            session.net.load_state_dict(saved["model"])
        distributed.fail_together(load, session.host_group)    # every rank reads the shared run folder
    return {"checkpoint": "best.pt", "best_epoch": best}


def final_evaluation(session: Session, state: TrainState, stop: StopFlag | None = None) -> None:
    """End of training: the per-epoch table, then single-crop vs 10-crop error of best.pt's
    weights (those of the last epoch when it is the best)."""
    if state.history:
        session.say.table(epochs_table(state.history))
    if not session.cfg.final_eval:
        return
    which = best_weights(session, state)
    what = (f"{which['checkpoint']} (epoch {which['best_epoch']}, the lowest validation top-1 error)"
            if which["best_epoch"] else f"last.pt (epoch {state.epoch})")
    write_eval(session, session.out / "eval.json", {"epoch": state.epoch, "step": state.step, **which}, stop, what)
    best = "" if session.cfg.keep_last_only else " best.pt,"
    session.say.line(f"train: done; run folder {session.out} (config.json, metrics.jsonl, last.pt,{best} eval.json)")
    if session.cfg.demo and on_sample_set(session.cfg.records):
        session.say.line(REAL_THING)


def on_sample_set(records: str | None) -> bool:
    """Whether ``records`` were built from the built-in sample set (its default folder)."""
    try:
        return Path(read_meta(Path(records or DEFAULT_RECORDS))["source"]).resolve() == DEFAULT_SAMPLE.resolve()
    except (RecordsError, KeyError, TypeError, OSError):
        return False


def report_profile(session: Session, phases: Phases, step: int) -> None:
    """--profile's table and profile.json for this process's steps up to global step ``step``:
    the warm-up dropped, the end-to-end window, the per-phase split, and the in-loop model
    rate measured now on a copy (``loop.model_rate``: the run's weights stay as they are).
    One process only for the model rate: a copy of one rank's net would leave out DDP's
    gradient all-reduce, so under torchrun it is None."""
    cfg = session.cfg
    model = (model_rate(session.net, session.optimizer, session.precision, phases.batch, cfg.profile_window,
                        compile_model=cfg.compile) if session.info.world == 1 else None)
    out, summary = session.out, phases.summary(step, model)
    session.say.table(profile_table(summary, session.devices))
    distributed.write_on_rank0(lambda: write_json(out / "profile.json", {**summary, "devices": session.devices,
                                                                        "trace": str(out / "trace.json")}),
                               session.info, session.host_group)
    session.say.line(f"train: profile in {out / 'profile.json'}, Chrome trace in {out / 'trace.json'}")


def eval_only(cfg: TrainConfig, info: distributed.DistInfo, say: Reporter) -> int:
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
    session = build_session(cfg, info, say, out)
    check_classes(state["model"], session, path)
    try:
        session.net.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ckpt.CheckpointError(f"{path}: its weights do not fit this model ({first})") from None
    out.mkdir(parents=True, exist_ok=True)
    # eval-<checkpoint>.json, not eval.json: beside a run's checkpoints that is the run's own final
    # evaluation (of last.pt), which a resumed run checks to know whether it still has to run it
    target = out / f"eval-{path.stem}.json"
    write_eval(session, target, {"checkpoint": str(path), "epoch": state["epoch"], "step": state["step"]},
               what=f"{path} (epoch {state['epoch']})")
    say.line(f"train: evaluated {path} (epoch {state['epoch']}, step {state['step']}); wrote {target}")
    return 0
