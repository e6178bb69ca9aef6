"""The conv1 kernels as one picture (the paper's Figure 3): one block per tower, each kernel
contrast-stretched on its own. tools.figures saves it as conv1.png; the training log shows
the same array in TensorBoard, without loading the figure tools."""
from __future__ import annotations

import math

import numpy as np

# conv1.png geometry (pixels): the paper's Figure 3 shows each tower's 48 kernels as 3 rows of 16
KERNEL_COLS = 16
KERNEL_SCALE = 5             # each 11x11 kernel drawn as 55x55 (nearest neighbour, no smoothing)
KERNEL_GAP = 2               # between kernels and around a tower's block
TOWER_GAP = 10               # between the two towers' blocks

BACKGROUND = 255             # white


def conv1_kernels(net) -> list[np.ndarray]:
    """Each tower's conv1 weights, float64 (48, 3, 11, 11) (RGB input channels)."""
    return [t.conv1.weight.detach().double().cpu().numpy() for t in net.towers]


def stretch(kernel: np.ndarray) -> np.ndarray:
    """One (3, k, k) kernel as uint8 (k, k, 3): its min to 0 and max to 255 over all three
    channels together (so colour balance is kept); a constant kernel is mid-grey."""
    lo, hi = float(kernel.min()), float(kernel.max())
    if hi <= lo:
        return np.full(kernel.shape[1:] + (3,), 128, np.uint8)
    return np.round((kernel.transpose(1, 2, 0) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def kernel_grid(towers: list[np.ndarray]) -> np.ndarray:
    """uint8 (H, W, 3): one block per tower, top to bottom, KERNEL_COLS kernels a row."""
    size = towers[0].shape[-1] * KERNEL_SCALE
    rows = math.ceil(max(len(t) for t in towers) / KERNEL_COLS)
    block_h = rows * size + (rows + 1) * KERNEL_GAP
    width = KERNEL_COLS * size + (KERNEL_COLS + 1) * KERNEL_GAP
    grid = np.full((len(towers) * block_h + (len(towers) - 1) * TOWER_GAP, width, 3), BACKGROUND, np.uint8)
    for b, tower in enumerate(towers):
        top = b * (block_h + TOWER_GAP)
        for i, kernel in enumerate(tower):
            r, c = divmod(i, KERNEL_COLS)
            y, x = top + KERNEL_GAP + r * (size + KERNEL_GAP), KERNEL_GAP + c * (size + KERNEL_GAP)
            big = stretch(kernel).repeat(KERNEL_SCALE, axis=0).repeat(KERNEL_SCALE, axis=1)
            grid[y:y + size, x:x + size] = big
    return grid
