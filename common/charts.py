"""Charts as PNG files, with matplotlib imported lazily on its non-interactive Agg backend.

matplotlib is imported only when a chart is drawn (its import is slow and not needed to train),
and always on Agg, so drawing works on a headless node, under SLURM or in CI, with no display.
Sizes are fixed (inches x dpi, no tight bounding box), so a chart's pixel size is known.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

from common.atomic import write_bytes

DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend (set before pyplot is first imported)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Render ``fig`` to PNG in memory, write it atomically, close it; ``metadata``: PNG text
    chunks (``{"Description": caption}``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=dict(metadata or {}))
    pyplot().close(fig)
    write_bytes(path, buf.getvalue())


def bar_chart(path: str | Path, rows: Mapping[str, tuple[float, float, float]], *, title: str,
              xlabel: str) -> None:
    """A bench table as horizontal bars: one row per entry, (median, min, max) each; the bar is
    the median, the whisker the min-max spread over the repeats. First row on top."""
    plt = pyplot()
    names = list(rows)
    med = [rows[n][0] for n in names]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(names)), layout="constrained")
    ys = list(range(len(names)))[::-1]
    spread = [[m - rows[n][1] for n, m in zip(names, med)], [rows[n][2] - m for n, m in zip(names, med)]]
    ax.barh(ys, med, xerr=spread, color="#4c72b0", capsize=3)
    ax.set_yticks(ys, names)
    for y, value in zip(ys, med):
        ax.annotate(f"{value:,.1f}", (value, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)
    save_figure(fig, path)
