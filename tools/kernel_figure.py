"""The paper's Figure 3 for tools.figures: conv1.png (the conv1 kernels, one block per tower) and
conv1.json (per tower, the colour share of the kernels' energy)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.atomic import write_json
from model.kernels import conv1_kernels, kernel_grid

from tools.captions import save_png, with_caption


def colour_share(kernels: np.ndarray) -> np.ndarray:
    """Per kernel, the share of its energy (sum of squared weights) that is not grey.

    Each kernel pixel's RGB weight vector w splits orthogonally into its grey part, the
    projection onto (1, 1, 1) (every channel = the mean of the three), and the rest;
    share = |rest|^2 / |w|^2 summed over the kernel's pixels. 0 for a kernel that sees only
    luminance (equal weights on R, G, B), 1 for one blind to luminance; random i.i.d. weights
    give 2/3 on average. The paper saw tower 0's kernels come out "largely colour-agnostic".
    """
    k = np.asarray(kernels, np.float64)
    grey = k.mean(axis=1, keepdims=True)
    total = (k ** 2).sum(axis=(1, 2, 3))
    rest = ((k - grey) ** 2).sum(axis=(1, 2, 3))
    return np.divide(rest, total, out=np.zeros_like(total), where=total > 0)


def conv1_figure(net, out: Path, caption: str | None = None) -> dict:
    """Write conv1.png (``caption`` on top where given) and conv1.json; return the colour-share
    summary."""
    towers = conv1_kernels(net)
    grid = kernel_grid(towers)
    save_png(with_caption(grid, caption) if caption else grid, out / "conv1.png", caption)
    shares = [colour_share(t) for t in towers]
    summary = {"colour_share": [float(s.mean()) for s in shares],
               "kernels": [[round(float(v), 4) for v in s] for s in shares],
               "meaning": "per tower, the mean over its conv1 kernels of the share of each kernel's "
                          "energy not in its grey (R=G=B) component: 0 = colour-agnostic; random = 2/3"}
    write_json(out / "conv1.json", summary)
    return summary
