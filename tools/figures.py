"""Pictures of a run: training curves, the paper's Figure 3 (conv1 kernels) and Figure 4 (neighbours).

    python -m tools.figures RUN_DIR [--checkpoint best.pt] [--records DIR] [--only curves,conv1]

writes into RUN_DIR:
- ``curves.png``: train loss and train/val top-1 and top-5 error per epoch, lr drops marked;
  reads ``metrics.jsonl``, so it works while the run is going (the file grows one line per epoch).
- ``conv1.png`` + ``conv1.json``: the conv1 kernels, tower 0's in the upper block and tower 1's in
  the lower (one block for the single-tower net), each kernel contrast-stretched on its own; and
  per tower the colour share of the kernels' energy (``colour_share``).
- ``neighbours.png`` + ``neighbours.json``: a few validation images (first column), each followed
  by the training images whose fc7 features (the last hidden layer, 4096-d) are nearest in
  Euclidean distance, centre view; a green frame = same class as the query, red = another class.
  Under each row the query's class name and its source photo; ``neighbours.json`` names every
  image's class and photo (from the records' ``<split>/keys.tsv``; records built before it was
  written give record keys only, said once).

Every PNG carries a caption line (the checkpoint, its epoch and step, the net's towers; for
``curves.png`` the run, its last epoch and step), drawn at the top and stored as the PNG's
``Description`` text.

Exit status: 0 done, 2 bad input (one ``error:`` line). The image grids are drawn with numpy +
Pillow (exact pixel sizes, no plotting library needed); the curves with matplotlib.
"""
from __future__ import annotations
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from common.charts import pyplot, save_figure
from common.cli import run_command
from common.config import ConfigError, Parser, check_at_least

from tools import weights
from tools.captions import FiguresError, checkpoint_caption, counted_towers
from tools.kernel_figure import conv1_figure
from tools.neighbours import NeighbourOptions, neighbours_figure
from engine.report import Reporter

FIGURES = ("curves", "conv1", "neighbours")
CURVES_SIZE = (10, 4)        # inches at common.charts.DPI (100): 1000 x 400 pixels


# --- curves -------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list of dicts; a last line that does not parse (a run writing it) is
    ignored, an unparsable line before it is an error."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise FiguresError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def lr_drops(metrics: list[dict]) -> list[tuple[int, float]]:
    """(epoch index the new lr started after, new lr) for every epoch whose lr is lower than the last's.

    Each metrics line's ``lr`` is the schedule's lr during that epoch, so a drop decided after
    epoch k shows as a lower lr on line k + 1; the line is drawn at x = k, the boundary."""
    return [(prev["epoch"], cur["lr"]) for prev, cur in zip(metrics, metrics[1:]) if cur["lr"] < prev["lr"]]


def plot_curves(metrics: list[dict], path: Path, title: str = "") -> None:
    """Two panels: train loss; top-1 and top-5 error (train and validation, in %), per epoch;
    ``title``: the caption line (on top, and the PNG's Description)."""
    plt = pyplot()
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=CURVES_SIZE, layout="constrained")
    epochs = [m["epoch"] for m in metrics]

    def series(key: str) -> list[float]:
        return [m.get(key, math.nan) for m in metrics]

    loss_ax.plot(epochs, series("train_loss"), "o-", label="train loss")
    if any("val_loss" in m for m in metrics):
        loss_ax.plot(epochs, series("val_loss"), "o--", label="val loss (centre)")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key, style, label in (("train_top1_err", "o-", "train top-1"), ("val_top1_err", "s-", "val top-1"),
                              ("train_top5_err", "o:", "train top-5"), ("val_top5_err", "s:", "val top-5")):
        err_ax.plot(epochs, [100 * v for v in series(key)], style, label=label)
    err_ax.set(xlabel="epoch", ylabel="error (%)", title="error (val: centre crop)", ylim=(0, 100))
    for ax in (loss_ax, err_ax):
        for epoch, lr in lr_drops(metrics):
            ax.axvline(epoch, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"lr {lr:.3g}", (epoch, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path, {"Description": title} if title else None)


def curves_caption(run_dir: Path, metrics: list[dict]) -> str:
    """``RUN · metrics.jsonl to epoch 3, step 6 · 2 towers`` (towers from the run's config.json)."""
    last = metrics[-1]
    parts = [run_dir.name or str(run_dir), f"metrics.jsonl to epoch {last.get('epoch')}, step {last.get('step')}"]
    try:
        towers = json.loads((run_dir / "config.json").read_text()).get("towers")
    except (OSError, ValueError, AttributeError):
        towers = None
    if isinstance(towers, int):
        parts.append(counted_towers(towers))
    return " · ".join(parts)


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m tools.figures", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder (train.py --out)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint for conv1/neighbours, relative to RUN_DIR or a path (default: best.pt, else last.pt)")
    p.add_argument("--records", default=None, help="records folder (default: the one the run trained on)")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {', '.join(FIGURES)}")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when a GPU is visible)")
    p.add_argument("--queries", type=int, default=NeighbourOptions.queries, help="validation images in neighbours.png")
    p.add_argument("--neighbours", type=int, default=NeighbourOptions.k, help="training images shown per query")
    p.add_argument("--batch-size", type=int, default=NeighbourOptions.batch_size, help="images per fc7 batch")
    p.add_argument("--train-limit", type=int, default=None, help="scan only the first N training images")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in FIGURES]
    if bad or not only:
        p.error(f"--only takes a subset of {', '.join(FIGURES)}; got {args.only!r}")
    try:
        check_at_least(args, ("queries", "neighbours", "batch_size", "train_limit"))
    except ConfigError as exc:
        p.error(str(exc))
    args.only = only
    return args


def checkpoint_path(run_dir: Path, checkpoint: str | None) -> Path | None:
    """The checkpoint to draw from; None when the run has none yet (only curves then)."""
    if checkpoint is None:
        return next((run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None)
    path = Path(checkpoint)
    if not path.is_file() and (run_dir / path).is_file():
        path = run_dir / path
    if not path.is_file():
        raise FiguresError(f"{path}: no such checkpoint file")
    return path


def make_figures(args: argparse.Namespace, say: Reporter) -> list[Path]:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FiguresError(f"{run_dir}: no such run folder")
    if not any((run_dir / n).exists() for n in ("config.json", "metrics.jsonl", "last.pt", "best.pt")):
        raise FiguresError(f"{run_dir}: not a run folder (no config.json, metrics.jsonl or checkpoint)")
    written = []
    if "curves" in args.only:
        metrics = read_metrics(run_dir / "metrics.jsonl")
        if metrics:
            plot_curves(metrics, run_dir / "curves.png", title=curves_caption(run_dir, metrics))
            written.append(run_dir / "curves.png")
        else:
            say.line(f"figures: {run_dir / 'metrics.jsonl'}: no finished epoch yet; no curves.png")
    rest = [f for f in args.only if f != "curves"]
    if not rest:
        return written
    path = checkpoint_path(run_dir, args.checkpoint)
    if path is None:
        say.line(f"figures: {run_dir}: no checkpoint yet; no {' or '.join(f + '.png' for f in rest)}")
        return written
    device = args.device or weights.default_device()
    trained = weights.load(path, records=args.records, device=device)
    say.line(f"figures: weights of {path} (epoch {trained.epoch}, step {trained.step}) on {device}")
    if "conv1" in rest:
        summary = conv1_figure(trained.net, run_dir, checkpoint_caption(trained))
        shares = ", ".join(f"tower {i}: {s:.3f}" for i, s in enumerate(summary["colour_share"]))
        say.line(f"figures: conv1 colour share of kernel energy (0 = grey, random = 0.667): {shares}")
        written.append(run_dir / "conv1.png")
    if "neighbours" in rest:
        opts = NeighbourOptions(queries=args.queries, k=args.neighbours, batch_size=args.batch_size,
                                train_limit=args.train_limit)
        neighbours_figure(trained, run_dir, device, opts, say)
        written.append(run_dir / "neighbours.png")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    say = Reporter(enabled=True, progress=sys.stdout.isatty())

    def work() -> None:
        written = make_figures(args, say)
        say.line("figures: wrote " + (", ".join(str(p) for p in written) or "nothing"))
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
