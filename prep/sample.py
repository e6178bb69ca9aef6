"""The built-in sample set: a small synthetic "ImageNet" written in ImageNet's folder layout.

    python -m prep.sample /tmp/sample            # 10 classes, 100 train + 20 val images each
    python prep/build_records.py                 # generates data/sample itself, then builds records

Every image is a JPEG of an ImageNet-like size (500x375, 375x500, 500x333, a few larger and
smaller, ~10% with a shorter side under 256). The class is a *texture* (horizontal stripes,
rings, spokes, dots, ...) drawn in a much darker shade of whatever lies behind it, inside a large
random ellipse (120-180% of the shorter side across, so it fills most of a 224 crop), over a
cluttered scene. The texture is what the net should learn, so it is made easy to see: high,
steady ink contrast, nothing drawn over it, little pixel noise, and a period of 2.2-4% of the
shorter side (about 6-10 px after the resize to 256, whatever the photo's size, so that conv1's
11x11 filters see a whole period). Colour narrows
the class down but does not decide it: the background is a gradient between two colours whose
hues lie within +-0.1 of the class's hue (classes are 0.1 apart, so neighbouring classes share
hues), random discs and boxes of random colours lie behind the texture, and a random colour cast
(per-channel gain), a brightness ramp and pixel noise finish it. The ink covers a random share of
the texture's area, in ranges that overlap across textures, so the amount of dark ink (which a
colour histogram sees) does not tell the texture either. Object identity under varying
illumination colour is what the paper's PCA lighting teaches, so colour must not give the class
away here. Every texture is mirror-symmetric (mirroring is one of the paper's augmentations), and
periods vary over 2x, so scale does not give it away either. AlexNet needs a few epochs to tell
them apart: the 3-epoch CPU demo ends clearly above 0% error, where single- vs 10-crop and the
augmentation switches can show a difference.

Odd inputs are planted on purpose, because real ImageNet has them and the records stage must
cope: a few grayscale and CMYK JPEGs, one PNG saved under a .JPEG name, and one corrupt
(truncated) JPEG, which the records stage skips and lists in skipped.json.

Deterministic: each image is drawn from its own seeded generator, so the same arguments give
byte-identical files (with the same Pillow / libjpeg build).
"""
from __future__ import annotations

import colorsys
import functools
import io
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import run_command
from common.config import Parser
from common.errors import UserError
from common.system import usable_cores

class SampleError(UserError):
    """The sample set could not be drawn; one line."""


# (width, height) of ImageNet-like photos and how often each appears.
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (640, 480),
         (1024, 768), (300, 225), (200, 150))
SIZE_WEIGHTS = np.array([40, 14, 18, 6, 8, 5, 3, 4, 2], dtype=np.float64)
SIZES = SIZES + ((240, 180), (180, 240))
SIZE_WEIGHTS = np.append(SIZE_WEIGHTS, [5.0, 3.0])
# Textures, all symmetric under a left-right mirror (the paper's flip must not change the class).
PATTERNS = ("hstripes", "vstripes", "checker", "diamonds", "rings", "spokes", "dots", "grid", "waves", "spots")
_COVERAGE = {"dots": (0.2, 0.38), "checker": (0.38, 0.5), "diamonds": (0.38, 0.5)}  # share of ink (0-1)
HUE_SPREAD = 0.1     # background hue = class hue +- this (0-1 hue circle; classes are 1/classes apart)
SOURCE_QUALITY = 90  # JPEG quality of the synthetic "camera" files (0-100)


def wnid(c: int) -> str:
    """A synthetic WordNet id, shaped like ImageNet's (n + 8 digits), e.g. n90000003."""
    return f"n9{c:07d}"


def _pattern(kind: str, w: int, h: int, period: float, phase: float, rng) -> np.ndarray:
    """A 0-1 float mask (h, w) drawing the texture, centred at a random point."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    k = 2 * np.pi / period
    if kind == "hstripes":
        m = np.sin(k * y + phase)
    elif kind == "vstripes":
        m = np.sin(k * x + phase)
    elif kind == "checker":
        m = np.sin(k * x + phase) * np.sin(k * y + phase)
    elif kind == "diamonds":
        m = np.sin(k * (x + y) / np.sqrt(2) + phase) * np.sin(k * (x - y) / np.sqrt(2) + phase)
    elif kind == "rings":
        m = np.sin(k * np.hypot(x - cx, y - cy) + phase)
    elif kind == "spokes":
        m = np.sin(np.round(rng.uniform(6, 12)) * np.arctan2(y - cy, x - cx) + phase)
    elif kind == "dots":
        m = np.cos(k * x + phase) + np.cos(k * y + phase) - 1.2
    elif kind == "grid":
        m = np.maximum(np.cos(k * x + phase), np.cos(k * y + phase)) - 0.8
    elif kind == "waves":
        m = np.sin(k * y + 3.0 * np.cos(k * (x - cx) / 2) + phase)
    else:  # spots: thresholded smooth noise, blobs of about a period
        small = rng.standard_normal((max(2, int(h / period * 2)), max(2, int(w / period * 2)))).astype(np.float32)
        m = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.Resampling.BICUBIC)) - 0.3
    # ink covers a random share of the texture's area, in ranges that overlap across the textures
    # (so the share of ink pixels, which a colour histogram sees, does not tell the texture) and
    # that keep each shape (dots above 0.4 would merge into diamonds)
    lo, hi = _COVERAGE.get(kind, (0.3, 0.5))
    return (m > np.quantile(m, 1 - rng.uniform(lo, hi))).astype(np.float32)


def _random_rgb(rng, hue: float | None = None) -> np.ndarray:
    """0-255 RGB of a random colour, or of a clearly coloured one of the given hue (0-1)."""
    if hue is None:
        return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 0.9), rng.uniform(0.25, 1.0)),
                        dtype=np.float32) * 255
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.4, 0.9), rng.uniform(0.55, 1.0)), dtype=np.float32) * 255


def _image(c: int, classes: int, seed: int, split: int, i: int) -> np.ndarray:
    """One uint8 RGB photo (h, w, 3) of class ``c``: its texture in a cluttered, randomly lit scene."""
    rng = np.random.default_rng([seed, split, c, i])
    w, h = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS / SIZE_WEIGHTS.sum())]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)  # background: a gradient between two random colours
    t = ((x / w - 0.5) * np.cos(angle) + (y / h - 0.5) * np.sin(angle) + 0.5)[..., None]
    # background: a gradient between two colours whose hues lie within +-HUE_SPREAD of the
    # class's hue, so hue narrows the class down to about 3 neighbours but never decides it;
    # light ones (value >= 0.55), so the dark ink shows on every background
    hue = c / classes
    bg = _random_rgb(rng, (hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0)
    bg2 = _random_rgb(rng, (hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0)
    img = bg * (1 - t) + bg2 * t
    for _ in range(rng.integers(2, 7)):  # clutter: discs and boxes of random colours behind the object
        r = rng.uniform(0.04, 0.1) * min(w, h)
        px, py = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.5:
            blob = np.hypot(x - px, y - py) <= r
        else:
            blob = (np.abs(x - px) <= r) & (np.abs(y - py) <= r * rng.uniform(0.4, 1.0))
        img[blob] = _random_rgb(rng)
    # the object: the class texture inside a random ellipse (120-180% of the shorter side across),
    # drawn last so no clutter hides it; its period is relative to the shorter side, so it comes
    # out at about 6-10 px after the resize to 256 for any photo size, and conv1's 11x11 filters
    # see a whole period
    period = rng.uniform(0.022, 0.04) * min(w, h)
    mask = _pattern(PATTERNS[c % len(PATTERNS)], w, h, period, rng.uniform(0, 2 * np.pi), rng)
    ex, ey = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
    rx, ry = (rng.uniform(0.6, 0.9, 2) * min(w, h))
    region = (((x - ex) / rx) ** 2 + ((y - ey) / ry) ** 2 <= 1).astype(np.float32)
    alpha = (mask * region * rng.uniform(0.85, 1.0))[..., None]
    ink = img * rng.uniform(0.1, 0.3)  # ink: a much darker shade (10-30%) of the scene behind it
    img = img * (1 - alpha) + ink * alpha
    gain = rng.uniform(0.8, 1.2, 3).astype(np.float32)               # colour cast of the light
    ramp = 1 + rng.uniform(-0.3, 0.3) * (x / w - 0.5)[..., None]      # uneven illumination
    img = img * gain * ramp + rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(1, 4)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, odd: str | None) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if odd == "png":
        img.save(buf, "PNG")  # a PNG under a .JPEG name, like one file in real ImageNet
    elif odd == "gray":
        img.convert("L").save(buf, "JPEG", quality=SOURCE_QUALITY)
    elif odd == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=SOURCE_QUALITY)
    else:
        img.save(buf, "JPEG", quality=SOURCE_QUALITY)
    return buf.getvalue()


def _odd_kind(split: str, c: int, i: int, classes: int) -> str | None:
    """A few grayscale and CMYK train images, one PNG: fixed positions, present in any size."""
    if split != "train":
        return None
    if i == 1 and c < min(3, classes):
        return "gray"
    if i == 2 and c >= classes - min(3, classes):
        return "cmyk"
    if i == 3 and c == 0:
        return "png"
    return None


def _jobs(root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int):
    """(path, class, split id, index, odd kind, truncate) for every file of the set."""
    jobs = []
    for c in range(classes):
        for i in range(train_per_class):
            path = root / "train" / wnid(c) / f"{wnid(c)}_{i}.JPEG"
            jobs.append((path, c, 0, i, _odd_kind("train", c, i, classes), False))
    last = classes - 1  # the one corrupt file: a JPEG cut to a third of its length
    jobs.append((root / "train" / wnid(last) / f"{wnid(last)}_{train_per_class}.JPEG",
                 last, 0, train_per_class, None, True))
    n = 0
    for c in range(classes):
        for i in range(val_per_class):
            n += 1
            jobs.append((root / "val" / wnid(c) / f"ILSVRC2012_val_{n:08d}.JPEG", c, 1, i, None, False))
    return jobs


def _write_one(job, classes: int, seed: int) -> None:
    path, c, split, i, odd, truncate = job
    data = _encode(_image(c, classes, seed, split, i), odd)
    path.write_bytes(data[: len(data) // 3] if truncate else data)


def make_sample_set(root: str | Path, classes: int = 10, train_per_class: int = 100,
                    val_per_class: int = 20, seed: int = 0, workers: int | None = None) -> Path:
    """Write the sample set under ``root`` (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG); return root.

    Train files are ``<wnid>_<i>.JPEG``; val files are ``ILSVRC2012_val_<n>.JPEG`` numbered
    globally (so they can be flattened into the official flat layout). There is exactly one
    extra train file, ``<wnid of the last class>_<train_per_class>.JPEG``, that is a truncated
    JPEG: the records stage must skip it and report it. ``workers`` processes draw the images
    (default: all cores; each image has its own seed, so the files do not depend on it).
    """
    if classes < 2 or train_per_class < 4 or val_per_class < 1:
        raise ValueError("sample set needs classes >= 2, train_per_class >= 4, val_per_class >= 1")
    root = Path(root)
    jobs = _jobs(root, classes, train_per_class, val_per_class, seed)
    for folder in sorted({job[0].parent for job in jobs}):
        folder.mkdir(parents=True, exist_ok=True)
    work = functools.partial(_write_one, classes=classes, seed=seed)
    workers = workers or usable_cores()
    if workers == 1 or len(jobs) < 200:  # small sets: a pool costs more than it saves
        for job in jobs:
            work(job)
    else:
        # an executor, not multiprocessing.Pool: a worker that dies (the out-of-memory killer)
        # fails the map here instead of leaving it waiting forever for the lost chunk
        try:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(work, jobs, chunksize=16):
                    pass
        except BrokenProcessPool:
            raise SampleError(f"{root}: a worker drawing the sample set died (out of memory?); "
                              "run the same command again") from None
    return root


def main(argv=None) -> int:
    ap = Parser(prog="python -m prep.sample", description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    def work() -> None:
        make_sample_set(a.root, a.classes, a.train_per_class, a.val_per_class, a.seed)
        print(f"wrote sample set to {a.root}")
    return run_command(work, errors=(UserError, OSError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
