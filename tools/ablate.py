"""The paper's section 3 as one experiment: what each of AlexNet's choices buys, with error bars.

    python -m tools.ablate RECORDS --out DIR [--variants paper,no-lrn,...] [--seeds 3]
                           [--epochs N | --budget-steps N] [--gpus IDS] [train flags ...]

Each (variant, seed) is an ordinary train.py run folder, DIR/<variant>/seed<k>, trained by
``train.py --out DIR/<variant>/seed<k> --auto-resume`` with the same records, recipe, budget and
seed k (the seed fixes the initial weights where the nets agree, the data order and every
augmentation draw, so seed k of two variants sees the same batches). A variant differs from
``paper`` by exactly one train.py flag (``VARIANTS``). A rerun of the same command skips the
finished runs and resumes an interrupted one from its last.pt, as ``train.py --resume`` does,
so an interrupted experiment ends with the same table as an uninterrupted one. Every run is
evaluated single-crop and 10-crop on the records' val split: train.py's final evaluation
(eval.json), or, when --budget-steps stops a run before its epochs end, ``train.py --eval-only``
on its last.pt (eval-last.json).

Writes DIR/ablation.json, DIR/ablation.md and DIR/ablation.png (tools/ablate_report.py); each
run's train.py output goes to its folder's ablate.log. Runs one at a time, on --gpus.
Exit status: 0 done, 2 bad input or a run that failed (one ``error:`` line naming its log),
3 a run's loss became NaN/inf, 128+signal when interrupted (rerun the command to go on).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from common.atomic import lock_folder, write_json
from common.config import build_parser, check_at_least
from common.console import counted, make_console
from common.cli import USER_ERROR, fail, run_command
from common.errors import UserError

from .ablate_report import net_cost, run_result, write_report

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train.py"

# Each variant is the paper's run plus these train.py flags: exactly one switch each.
VARIANTS: dict[str, tuple[str, ...]] = {
    "paper": (),
    "no-lrn": ("--no-lrn",),
    "no-overlap": ("--no-overlap-pool",),
    "no-dropout": ("--dropout", "0"),
    "no-lighting": ("--lighting", "0"),
    "one-tower-half": ("--towers", "1"),
}
DONE = "ablate-done.json"      # in a run folder: the flags it finished with and its evaluation file
LOG = "ablate.log"             # in a run folder: train.py's output, appended per attempt
LOCK = ".ablate.lock"          # in DIR: one ablation per folder at a time


def _h(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class AblateConfig:
    records: str | None = field(default=None, metadata=_h(
        "records folder (prep/build_records.py); also the first positional argument"))
    out: str | None = field(default=None, metadata=_h("the experiment's folder: one run folder per (variant, seed)"))
    variants: str = field(default=",".join(VARIANTS), metadata=_h(
        f"comma list of {', '.join(VARIANTS)}; paper, the baseline, always runs"))
    seeds: int = field(default=3, metadata=_h("seeds 0..N-1 per variant (differences are paired by seed)"))
    epochs: int | None = field(default=None, metadata=_h("train.py --epochs for every run (default: train.py's, 90)"))
    budget_steps: int | None = field(default=None, metadata=_h(
        "stop every run after N optimiser steps (train.py --max-steps) and evaluate its last weights"))
    gpus: str | None = field(default=None, metadata=_h("train.py --gpus for every run (default: train.py's, auto)"))
    # the recipe flags a small budget needs; default: train.py's (the paper's)
    batch_size: int | None = field(default=None, metadata=_h("train.py --batch-size"))
    lr: float | None = field(default=None, metadata=_h("train.py --lr"))
    warmup_steps: int | None = field(default=None, metadata=_h("train.py --warmup-steps"))
    epoch_steps: int | None = field(default=None, metadata=_h("train.py --epoch-steps (cap on steps per epoch)"))
    plateau_patience: int | None = field(default=None, metadata=_h("train.py --plateau-patience"))
    workers: int | None = field(default=None, metadata=_h("train.py --workers"))
    amp: str | None = field(default=None, metadata=_h("train.py --amp", choices=["none", "bf16", "fp16"]))
    report_only: bool = field(default=False, metadata=_h("train nothing: write the report from the finished runs"))
    progress: bool = field(default=True, metadata=_h("a progress bar (only when stdout is a terminal)"))

    def __post_init__(self) -> None:
        check_at_least(self, ("seeds", "epochs", "budget_steps", "batch_size", "epoch_steps", "plateau_patience",
                              "workers"))
        check_at_least(self, ("warmup_steps",), minimum=0)
        if not self.records:
            raise ValueError("the records folder is missing: python -m tools.ablate RECORDS --out DIR")
        if not self.out:
            raise ValueError("--out DIR is missing (the experiment's folder)")
        names = self.variant_list()
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"--variants takes a comma list of {', '.join(VARIANTS)} without repeats, "
                             f"got {self.variants!r}")

    def variant_list(self) -> list[str]:
        """The variants asked for, ``paper`` first (the baseline every difference is taken from)."""
        names = [v.strip() for v in self.variants.split(",") if v.strip()]
        return ["paper", *[v for v in names if v != "paper"]]


# the AblateConfig fields handed on to every train.py run as the flag of the same name
PASSED = ("epochs", "gpus", "batch_size", "lr", "warmup_steps", "epoch_steps", "plateau_patience", "workers", "amp")


class AblateError(UserError):
    """A run that failed, or a folder the experiment cannot use; one line, and the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def parse_args(argv: Sequence[str] | None) -> AblateConfig:
    parser = build_parser(AblateConfig, prog="python -m tools.ablate", description=__doc__,
                          metavars={"records": "DIR", "out": "DIR", "gpus": "IDS", "lr": "LR"},
                          usage="python -m tools.ablate RECORDS --out DIR [options]")
    parser.add_argument("records_arg", nargs="?", metavar="RECORDS", help="records folder")
    values = vars(parser.parse_args(argv))
    given = values.pop("records_arg")
    if given and values["records"] and given != values["records"]:
        parser.error(f"two records folders: {given} and --records {values['records']}")
    values["records"] = given or values["records"]
    try:
        cfg = AblateConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise   # unreachable: parser.error exits
    for variant in cfg.variant_list():         # train.py's own checks, now rather than at run 7
        train_config(cfg, variant, 0, parser)
    return cfg


def run_flags(cfg: AblateConfig, variant: str, seed: int) -> list[str]:
    """The train.py flags of one run (all but --out and how it continues). --keep-last-only: every
    run is judged on its last weights, whether its epochs or a step budget end it (train.py's final
    table would otherwise pick best.pt by the same val set the comparison is read on)."""
    flags = ["--records", str(Path(cfg.records).absolute()), "--seed", str(seed), "--keep-last-only",
             *VARIANTS[variant]]
    for name in PASSED:
        value = getattr(cfg, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if cfg.budget_steps is not None:
        flags += ["--max-steps", str(cfg.budget_steps)]
    return flags


def train_config(cfg: AblateConfig, variant: str, seed: int, parser=None):
    """The TrainConfig train.py will parse from ``run_flags`` (exit 2 with one line if invalid)."""
    from engine.config import parse_train_args
    try:
        return parse_train_args(run_flags(cfg, variant, seed))
    except SystemExit:
        if parser is not None:
            parser.exit(2, f"{parser.prog}: variant {variant}: the train.py flags above are invalid\n")
        raise


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


# --- running one train.py -------------------------------------------------------------------

class Children:
    """The train.py process running now, and the signal that asked the experiment to stop.

    train.py runs in its own session, so a Ctrl-C at the terminal reaches only this process,
    which passes it on once (a second SIGINT would make train.py quit without saving); on
    Linux the child is also sent SIGTERM if this process dies (it saves and exits)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> "Children":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self, argv: list[str], log: Path) -> int:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"\n$ {' '.join(argv)}\n")
            fh.flush()
            # unbuffered: the log follows the run line by line (tail -f RUN/ablate.log)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, env=env, start_new_session=True, preexec_fn=_die_with_parent)
            try:
                return self.proc.wait()      # a signal meanwhile: _on_signal passes it on, the wait goes on
            finally:
                self.proc = None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def epochs_done(run: Path) -> int:
    try:
        lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return int(json.loads(lines[-1])["epoch"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def eval_step(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train_one(cfg: AblateConfig, out: Path, variant: str, seed: int, kids: Children, epochs: int) -> str:
    """Train (or continue) one run and make sure it has its final evaluation; the name of the
    evaluation file. AblateError if train.py failed; the signal's status via kids.signal."""
    run = run_dir(out, variant, seed)
    run.mkdir(parents=True, exist_ok=True)
    flags = run_flags(cfg, variant, seed)
    (run / DONE).unlink(missing_ok=True)      # new flags (a longer budget): not done until evaluated again
    python = [sys.executable, str(TRAIN)]
    rc = kids.run([*python, *flags, "--out", str(run), "--auto-resume", "--no-progress"], run / LOG)
    _check(rc, kids, run, variant, seed)
    if kids.signal is not None:               # train.py saved where it stopped; a rerun goes on
        return ""
    if epochs_done(run) >= epochs:            # train.py's own final evaluation of the last weights
        eval_file = "eval.json"
        if not (run / eval_file).exists():
            raise AblateError(f"{run}: trained its {epochs} epochs but wrote no eval.json; see {run / LOG}")
    elif cfg.budget_steps is None:
        raise AblateError(f"{run}: train.py ended before its {epochs} epochs without a step budget; see {run / LOG}")
    else:                                     # --budget-steps stopped it first: evaluate last.pt
        eval_file = "eval-last.json"
        if eval_step(run / eval_file) != cfg.budget_steps:
            argv = [*python, "--eval-only", "--checkpoint", str(run / "last.pt"), "--out", str(run), "--no-progress"]
            for name in ("gpus", "workers", "amp"):
                if getattr(cfg, name) is not None:
                    argv += [f"--{name}", str(getattr(cfg, name))]
            _check(kids.run(argv, run / LOG), kids, run, variant, seed)
            if kids.signal is not None:
                return ""
    write_json(run / DONE, {"flags": result_flags(flags), "eval": eval_file})
    return eval_file


def _check(rc: int, kids: Children, run: Path, variant: str, seed: int) -> None:
    if rc == 0 or kids.signal is not None:
        return
    if rc < 0 or rc >= 128:
        raise AblateError(f"{run}: train.py was stopped by a signal (status {rc}); see {run / LOG}; "
                          "rerun the command to resume it")
    what = "its loss became NaN/inf (exit 3)" if rc == 3 else f"train.py exited with status {rc}"
    raise AblateError(f"{run / LOG}: {variant} seed {seed}: {what}", rc if rc in (2, 3) else 2)


# where a run trains, not what it computes: another machine's --gpus or --workers does not
# make a finished run unfinished
DEVICE_FLAGS = ("--gpus", "--workers")


def result_flags(flags: list[str]) -> list[str]:
    """``flags`` without the device flags and their values."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in DEVICE_FLAGS:
            skip = True
        else:
            kept.append(flag)
    return kept


def finished(run: Path, flags: list[str]) -> str | None:
    """The evaluation file of a run that finished with these flags, else None."""
    try:
        done = json.loads((run / DONE).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(done, dict) or not isinstance(done.get("flags"), list)
            or result_flags(done["flags"]) != result_flags(flags)
            or not (run / str(done.get("eval"))).is_file()):
        return None
    return done["eval"]


# --- the experiment -------------------------------------------------------------------------

class Progress:
    """Runs done / total and an ETA: a rich bar in a terminal, plain lines anywhere else."""

    def __init__(self, total: int, done: int, show_bar: bool):
        self.total, self.done, self.trained, self.seconds = total, done, 0, 0.0
        self.console = make_console(highlight=False)
        self.bar = None
        if show_bar and self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            from rich.progress import Progress as RichProgress
            self.bar = RichProgress(TextColumn("ablation"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                    console=self.console)
            self.task = self.bar.add_task("ablation", total=total, completed=done, info="")
            self.bar.start()

    def line(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def starting(self, variant: str, seed: int, run: Path) -> None:
        if self.bar is not None:
            self.bar.update(self.task, info=f"{variant} seed {seed}")
        else:
            self.line(f"ablate: [{self.done + 1}/{self.total}] {variant} seed {seed}: training in {run}")

    def finished(self, variant: str, seed: int, seconds: float, result: dict) -> None:
        self.done += 1
        self.trained += 1
        self.seconds += seconds
        left = (self.total - self.done) * self.seconds / self.trained
        text = (f"ablate: [{self.done}/{self.total}] {variant} seed {seed} done in {_duration(seconds)}: "
                f"top-1 error {100 * result['center']['top1_err']:.2f}% (1 crop), "
                f"{100 * result['tencrop']['top1_err']:.2f}% (10 crops); ETA {_duration(left)}")
        if self.bar is not None:
            self.bar.update(self.task, advance=1)
            self.bar.console.print(text, soft_wrap=True)
        else:
            self.line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def experiment(cfg: AblateConfig) -> int:
    from records.folder import read_meta
    out = Path(cfg.out)
    records = Path(cfg.records)
    meta_json = read_meta(records)               # a missing or foreign folder: one line, before any run
    variants, seeds = cfg.variant_list(), list(range(cfg.seeds))
    configs = {v: train_config(cfg, v, 0) for v in variants}
    epochs = configs["paper"].epochs
    classes = len(meta_json["classes"])
    if out.exists() and not out.is_dir():
        raise AblateError(f"{out}: exists and is not a folder; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_folder(out / LOCK)
    except BlockingIOError:
        raise AblateError(f"{out}: another tools.ablate is running this experiment (it holds {out / LOCK})") from None
    try:
        jobs = [(v, s) for s in seeds for v in variants]   # seed by seed: a partial experiment is paired
        done = {(v, s): finished(run_dir(out, v, s), run_flags(cfg, v, s)) for v, s in jobs}
        results: dict[str, dict[int, dict]] = {}
        for (v, s), eval_file in done.items():
            if eval_file:
                results.setdefault(v, {})[s] = run_result(run_dir(out, v, s), eval_file)
        status = 0
        if not cfg.report_only:
            status = train_all(cfg, out, jobs, done, results, epochs)
        budget = (counted(cfg.budget_steps, "step") if cfg.budget_steps else counted(epochs, "epoch")) + (
            f" of at most {cfg.epoch_steps} steps" if cfg.epoch_steps else "") + (
            f", batch {cfg.batch_size}" if cfg.batch_size else "") + (f", lr {cfg.lr:g}" if cfg.lr else "")
        meta = {"records": str(records.absolute()), "classes": classes, "val_images": int(meta_json["counts"]["val"]),
                "train_images": int(meta_json["counts"]["train"]), "seeds": seeds, "variants": variants,
                "budget": budget, "train_flags": {v: run_flags(cfg, v, 0)[4:] for v in variants},
                "complete": all(s in results.get(v, {}) for v, s in jobs),
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        costs = {v: net_cost(configs[v].towers, configs[v].overlap_pool, classes) for v in variants}
        if any(results.values()):
            write_report(out, results, variants, meta, costs)
            print(f"ablate: wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}"
                  + ("" if meta["complete"] else " (from the runs finished so far)"))
        return status
    finally:
        os.close(lock)


def train_all(cfg: AblateConfig, out: Path, jobs: list, done: dict, results: dict, epochs: int) -> int:
    progress = Progress(len(jobs), sum(1 for e in done.values() if e), cfg.progress)
    kids = Children().install()
    try:
        if progress.done:
            progress.line(f"ablate: {progress.done} of {len(jobs)} runs already finished in {out}; skipping them")
        for v, s in jobs:
            if done[v, s]:
                continue
            run = run_dir(out, v, s)
            progress.starting(v, s, run)
            start = time.monotonic()
            eval_file = train_one(cfg, out, v, s, kids, epochs)
            if kids.signal is not None:
                name = signal.Signals(kids.signal).name
                progress.line(f"ablate: {name} received; {run} saved where it stopped. Rerun the same command to "
                              "resume: finished runs are skipped, this one continues from its last.pt")
                return 128 + kids.signal
            results.setdefault(v, {})[s] = run_result(run, eval_file)
            progress.finished(v, s, time.monotonic() - start, results[v][s])
        return 0
    finally:
        kids.restore()
        progress.close()


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)

    def work() -> int:
        try:
            return experiment(cfg)
        except AblateError as exc:
            if exc.status == USER_ERROR:
                raise
            fail(str(exc))
            return exc.status                      # a run's NaN/inf loss keeps train.py's status 3
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
