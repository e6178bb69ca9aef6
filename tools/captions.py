"""What every picture of tools.figures shares: the caption line on top, the PNG writer that also
stores it as the PNG's ``Description`` text, the captions' wording, and the one-line error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from common.atomic import atomic_open
from common.errors import UserError
from model.kernels import BACKGROUND

from tools import weights

CAPTION = 20                 # pixels: the caption line on top of conv1.png and neighbours.png
MARGIN = 4                   # pixels left of a text line (the neighbours grid's gap, so rows line up)
INK = (0, 0, 0)


class FiguresError(UserError):
    """A run folder or option problem; one line."""


def counted_towers(n: int) -> str:
    return f"{n} tower" + ("" if n == 1 else "s")


def checkpoint_caption(trained: weights.Trained) -> str:
    """``RUN/best.pt · epoch 3, step 6 · 2 towers``: which weights a picture shows."""
    src = trained.source
    return (f"{src.parent.name}/{src.name} · epoch {trained.epoch}, step {trained.step} · "
            f"{counted_towers(trained.net.cfg.towers)}")


def text_strip(text: str, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): ``text`` in black on the figures' white, one line, left-aligned
    (cut at the right edge where longer than the picture is wide)."""
    strip = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    top = draw.textbbox((0, 0), text, font=font)
    draw.text((MARGIN, (height - (top[3] - top[1])) // 2 - top[1]), text, fill=INK, font=font)
    return np.asarray(strip)


def with_caption(grid: np.ndarray, caption: str) -> np.ndarray:
    """The caption line on top of an image grid."""
    return np.concatenate([text_strip(caption, grid.shape[1], CAPTION), grid])


def save_png(array: np.ndarray, path: Path, caption: str | None = None) -> None:
    """``array`` as a PNG, written atomically; ``caption`` also as its Description text."""
    info = PngImagePlugin.PngInfo()
    if caption:
        info.add_text("Description", caption)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(array).save(fh, format="PNG", pnginfo=info)
