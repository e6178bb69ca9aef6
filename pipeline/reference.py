"""The three views in plain numpy/PIL, with every random draw passed in explicitly.

This is the oracle the DALI graphs are tested against and the per-image core of the
PyTorch ``DataLoader`` baseline. Pixels are on the 0–255 scale throughout (the paper's
input: mean subtracted, NOT divided by std).

    from pipeline import reference as ref
    img = ref.decode(jpeg_bytes)                              # (256, 256, 3) uint8 RGB
    d = ref.draw(np.random.default_rng(0))                    # y, x in 0..32, flip, alpha (3,)
    x = ref.train_view(img, d.y, d.x, d.flip, d.alpha, stats, stats.mean)  # (3, 224, 224)
    v = ref.ten_crop(img, stats.mean)                         # (10, 3, 224, 224)

``mean`` is either the per-channel mean, shape (3,), or the per-pixel mean image,
shape (256, 256, 3); either way it is subtracted from the full image before cropping,
which is the same as cropping (and flipping) the mean image with the image's window.

Ten-crop order (``TEN_CROP_WINDOWS``): top-left, top-right, bottom-left, bottom-right,
centre, then the same five windows mirrored left-right (crop 5 is crop 0 flipped).
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

SIZE = 256            # records are 256×256 (the records contract)
CROP = 224            # the paper's patch size
MAX_OFFSET = SIZE - CROP   # 32: window offsets are integers 0..32 on each axis
LIGHTING_STD = 0.1    # the paper: alpha_i ~ N(0, 0.1)
PIXEL_SCALE = 255.0   # records and stats.json are on the 0–255 scale

# (y, x) offsets of the five windows; the last five crops are these, mirrored.
TEN_CROP_WINDOWS = (
    (0, 0),                          # top-left
    (0, MAX_OFFSET),                 # top-right
    (MAX_OFFSET, 0),                 # bottom-left
    (MAX_OFFSET, MAX_OFFSET),        # bottom-right
    (MAX_OFFSET // 2, MAX_OFFSET // 2),  # centre (16, 16)
)


@dataclass(frozen=True)
class TrainDraw:
    """The random numbers of one training view."""
    y: int              # window top, 0..32
    x: int              # window left, 0..32
    flip: bool          # mirror left-right
    alpha: np.ndarray   # (3,) lighting coefficients, N(0, 0.1) each


def draw(rng: np.random.Generator) -> TrainDraw:
    """Draws with the same distribution as the DALI train graph (uniform integer offsets)."""
    y, x = (int(v) for v in rng.integers(0, MAX_OFFSET + 1, size=2))
    return TrainDraw(y=y, x=x, flip=bool(rng.random() < 0.5),
                     alpha=rng.normal(0.0, LIGHTING_STD, size=3))


def decode(jpeg: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 RGB (libjpeg-turbo through PIL, like DALI's CPU decoder)."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))


def lighting_magnitudes(eigval: np.ndarray) -> np.ndarray:
    """The paper's lambda_i, as a shift in 0–255 units: eigval (0–255², from stats.json) / 255.

    Why: the paper adds ``eigvec @ (alpha * lambda)`` with lambda the eigenvalues of the
    covariance of pixel values. Eigenvalues scale with the square of the pixel scale, so the
    formula is only meaningful on one scale: that of Caffe's and fb.resnet's implementations,
    pixels in 0–1 (lambda_1 ~ 0.08, shifts of about 0.01: a few grey levels). On 0–1 pixels
    the shift is eigvec @ (alpha * eigval/255²); times 255 for our 0–255 pixels gives eigval/255. Applied
    to 0–255 eigenvalues directly the shift would be ~±500 grey levels and wash every image
    out (λ1 ≈ 5,000 on ImageNet-like data).
    """
    return np.asarray(eigval, np.float64) / PIXEL_SCALE


def lighting_shift(alpha: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray) -> np.ndarray:
    """The paper's PCA lighting: the RGB shift eigvec @ (alpha * lambda), (3,), in 0–255 units.

    ``eigval`` is stats.json's (0–255² units); lambda = ``lighting_magnitudes(eigval)``.
    """
    lam = lighting_magnitudes(eigval)
    return np.asarray(eigvec, np.float64) @ (np.asarray(alpha, np.float64) * lam)


def _window(img: np.ndarray, mean: np.ndarray, y: int, x: int, flip: bool,
            shift: np.ndarray | None = None) -> np.ndarray:
    """Subtract mean (and add shift) on the full image, cut the window, flip, HWC -> CHW float32."""
    if not (0 <= y <= img.shape[0] - CROP and 0 <= x <= img.shape[1] - CROP):
        raise ValueError(f"window ({y}, {x}) is outside a {img.shape[0]}x{img.shape[1]} image")
    full = img.astype(np.float32) - np.asarray(mean, np.float32)
    if shift is not None:
        full = full + np.asarray(shift, np.float32)
    patch = full[y:y + CROP, x:x + CROP]
    if flip:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch.transpose(2, 0, 1))


def train_view(img: np.ndarray, y: int, x: int, flip: bool, alpha: np.ndarray,
               stats, mean: np.ndarray) -> np.ndarray:
    """One training input: window (y, x), optional mirror, lighting from ``stats`` (eigval,
    eigvec), minus ``mean`` ((3,) or (256, 256, 3)); float32 (3, 224, 224), 0–255 scale."""
    shift = lighting_shift(alpha, stats.eigval, stats.eigvec)
    return _window(img, mean, y, x, flip, shift)


def center_view(img: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The central 224×224 window minus ``mean``: float32 (3, 224, 224), 0–255 scale."""
    y, x = TEN_CROP_WINDOWS[4]
    return _window(img, mean, y, x, False)


def ten_crop(img: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The paper's 10 test patches in ``TEN_CROP_WINDOWS`` order, unflipped then flipped:
    float32 (10, 3, 224, 224), 0–255 scale."""
    views = [_window(img, mean, y, x, flip) for flip in (False, True) for (y, x) in TEN_CROP_WINDOWS]
    return np.stack(views)


def iter_tar(tar_path: str | Path) -> Iterator[tuple[str, bytes, int]]:
    """(key, jpeg bytes, label) for each sample of one records shard, in file order."""
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            parts = pending.setdefault(key, {})
            parts[ext] = tf.extractfile(member).read()
            if "jpg" in parts and "cls" in parts:
                del pending[key]
                yield key, parts["jpg"], int(parts["cls"].decode("ascii"))
    if pending:
        raise ValueError(f"{tar_path}: samples without both .jpg and .cls: {sorted(pending)[:3]}")
