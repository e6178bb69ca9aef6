"""Charts as PNG files, with matplotlib imported lazily on its non-interactive Agg backend.

matplotlib is imported only when a chart is drawn (it costs ~0.5 s and is not needed to train),
and always on Agg, so drawing works on a headless node, under SLURM or in CI, with no display.
Sizes are fixed (inches x dpi, no tight bounding box), so a chart's pixel size is known.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from common.atomic import write_bytes

DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend (set before pyplot is first imported)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path) -> None:
    """Render ``fig`` to PNG in memory, write it atomically, close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    pyplot().close(fig)
    write_bytes(path, buf.getvalue())


def bar_chart(path: str | Path, labels: Sequence[str], values: Sequence[float], *, title: str,
              xlabel: str, errors: Sequence[tuple[float, float]] | None = None) -> None:
    """A horizontal bar chart of one number per row (a bench table's main column).

    ``errors``: optional (low, high) per row, drawn as a min-max whisker around the bar.
    """
    plt = pyplot()
    height = 1.2 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(8, height), layout="constrained")
    rows = list(range(len(labels)))[::-1]          # first table row on top
    xerr = None
    if errors is not None:
        xerr = [[v - lo for v, (lo, _) in zip(values, errors)], [hi - v for v, (_, hi) in zip(values, errors)]]
    ax.barh(rows, values, xerr=xerr, color="#4c72b0", capsize=3)
    ax.set_yticks(rows, labels)
    for row, value in zip(rows, values):
        ax.annotate(f"{value:,.1f}", (value, row), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    save_figure(fig, path)
