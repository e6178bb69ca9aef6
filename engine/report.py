"""What the user sees: progress bars, per-epoch lines, end-of-run tables (rich, rank 0 only)."""
from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from common.console import make_console

from .profiling import PHASES


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


class Reporter:
    """Console output of one process; silent on ranks other than 0.

    Progress bars only in a terminal: anywhere else (nohup, SLURM, CI, a pipe) a bar's
    control characters would garble the log, and plain lines (engine/logs.py) take its place.
    """

    def __init__(self, enabled: bool, progress: bool):
        self.enabled = enabled
        self.console = make_console(highlight=False)
        self.show_progress = enabled and progress and self.console.is_terminal

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, soft_wrap=True)

    def bar(self, description: str, total: int, completed: int = 0):
        """A context manager yielding show(n=1, completed=None, **fields): advance by ``n``, or
        show ``completed`` (a count the caller keeps, such as the state's batch); a no-op
        without progress bars."""
        if not self.show_progress:
            return contextlib.nullcontext(lambda n=1, completed=None, **fields: None)
        return _Bar(self.console, description, total, completed)

    def table(self, table: Table) -> None:
        """Print ``table``; a title wider than the table goes on its own line above it (rich
        would wrap it to the table's width, mid-phrase)."""
        if not self.enabled:
            return
        title = table.title
        if isinstance(title, str) and len(title) > self.console.measure(table).maximum:
            self.console.print(title, soft_wrap=True)
            table.title = None
            try:
                self.console.print(table)
            finally:
                table.title = title
        else:
            self.console.print(table)


class _Bar:
    def __init__(self, console: Console, description: str, total: int, completed: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.task = self.progress.add_task(description, total=total, completed=completed, info="")

    def __enter__(self):
        self.progress.start()
        return lambda n=1, completed=None, **fields: self.progress.update(
            self.task, advance=None if completed is not None else n, completed=completed, **fields)

    def __exit__(self, *exc):
        self.progress.stop()
        return False


def epoch_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.4f}  "
            f"train err top-1 {pct(m['train_top1_err'])} top-5 {pct(m['train_top5_err'])}  "
            f"val err top-1 {pct(m['val_top1_err'])} top-5 {pct(m['val_top5_err'])}  "
            f"lr {m['lr']:.3g}  {m['images_per_s']:.1f} img/s")


def epochs_table(history: list[dict]) -> Table:
    t = Table(title="Training (errors are 1 - accuracy; validation on the centre crop)")
    for col in ("epoch", "lr", "train loss", "train top-1", "train top-5", "val top-1", "val top-5", "img/s"):
        t.add_column(col, justify="right")
    for m in history:
        t.add_row(str(m["epoch"]), f"{m['lr']:.3g}", f"{m['train_loss']:.4f}", pct(m["train_top1_err"]),
                  pct(m["train_top5_err"]), pct(m["val_top1_err"]), pct(m["val_top5_err"]),
                  f"{m['images_per_s']:.1f}")
    return t


def crops_table(single: dict, ten: dict, classes: int, what: str = "") -> Table:
    """``what``: the weights evaluated (e.g. 'best.pt (epoch 7, ...)'), named in the title."""
    of = f" of {what}" if what else ""
    t = Table(title=f"Validation error{of}, {single['images']} images, {classes} classes "
                    "(the paper's Table 1 style: single-crop vs 10-crop softmax voting)")
    t.add_column("")
    t.add_column("1 crop (centre)", justify="right")
    t.add_column("10 crops (voted)", justify="right")
    t.add_row("top-1 error", pct(single["top1_err"]), pct(ten["top1_err"]))
    t.add_row("top-5 error", pct(single["top5_err"]), pct(ten["top5_err"]))
    return t


def profile_table(summary: dict, devices: list[str]) -> Table:
    t = Table(title=f"Where a training step's time goes ({summary['steps']} steps on {', '.join(devices)}; "
                    f"{summary['images_per_s']:.1f} img/s, data stall {summary['data_stall_percent']:.2f}%)")
    t.add_column("phase")
    t.add_column("ms / step", justify="right")
    t.add_column("share", justify="right")
    for p in PHASES:
        t.add_row(p, f"{summary['phases'][p]['ms_per_step']:.2f}", f"{summary['phases'][p]['percent']:.1f}%")
    t.add_row("step", f"{summary['step_ms']:.2f}", "100.0%")
    t.caption = profile_rates(summary)
    return t


def profile_rates(summary: dict) -> str:
    """The unprofiled figures under the split: the warm-up dropped, end-to-end vs the in-loop model rate."""
    def rate(key: str, steps: str) -> str:
        value = summary.get(key)
        return f"{value:.1f} img/s ({summary.get(steps, 0)} steps)" if value else "not measured"
    stall = summary.get("stall_percent")
    return (f"warm-up dropped: {summary.get('warmup_steps', 0)} steps; end-to-end (no phase syncs): "
            f"{rate('end_to_end_images_per_s', 'end_to_end_steps')}; in-loop model (one batch on the device): "
            f"{rate('model_images_per_s', 'model_steps')}; stall = 1 - end-to-end / model: "
            + (f"{stall:.1f}%" if stall is not None else "not measured"))
