"""Exact RGB statistics of the training pixels (0-255 scale) and their eigen-decomposition.

Per image we keep integer sums: n (pixels), S = sum x (3 ints) and Q = sum x x^T (3x3 ints)
over its 256x256 RGB pixels (0-255). Integer sums combine exactly in any order, so the result
does not depend on worker count or shard order. Only at the end do we divide, with Python's
correctly rounded int/int division:

    mean = S / n,   cov = (n Q - S S^T) / n^2   (population covariance of 0-255 pixels: 0-255² units)

and decompose cov in float64 (numpy.linalg.eigh). That covariance's eigenvectors and
eigenvalues are what the paper's PCA lighting uses ("eigen-colours").

Speed: this runs once per training image beside the decode, resize and encode, and is most of
what the writer adds to them (BENCHMARKS.md, "Prep"). ``add_image`` works on the 8-bit
planes in integers: each product x_i x_j <= 255^2 fits uint16 exactly, and OpenCV sums the
uint16 products (and the 8-bit planes, for S) with integer accumulators into a double. Every
value involved is an integer below 65536 * 255^2 < 2^53 for a 256x256 image, so the double
holds it exactly in any summation order (MAX_PIXELS guards bigger images). tests/test_prep.py
checks it against Python-int arithmetic, including all-255 images. Do not replace it with a
float32 product (inexact past 2^24) or numpy's uint64 sum (exact, but slower than OpenCV's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

MAX_PIXELS = (2**53 - 1) // 255**2  # double sums stay exact below this (~138M pixels)
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


@dataclass
class PixelSums:
    """Exact integer sums over a set of images: n pixels, S (3,), Q (3x3, upper+lower)."""
    n: int = 0
    s: list[int] = field(default_factory=lambda: [0, 0, 0])
    q: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])

    def add_image(self, arr: np.ndarray) -> None:
        """Add one uint8 (H, W, 3) RGB image (module docstring: exact, integer arithmetic)."""
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"add_image needs a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
        n = arr.shape[0] * arr.shape[1]
        if n > MAX_PIXELS:
            raise ValueError(f"image of {n} pixels: the double sums would not be exact")
        arr = np.ascontiguousarray(arr)
        planes = [p.astype(np.uint16) for p in cv2.split(arr)]   # uint16 x uint16: no cast per product
        self.n += n
        for c, v in enumerate(cv2.sumElems(arr)[:3]):
            self.s[c] += int(v)
        q = self.q
        for i, j in _PAIRS:
            v = int(cv2.sumElems(np.multiply(planes[i], planes[j]))[0])
            q[i][j] += v
            if i != j:
                q[j][i] += v

    def merge(self, other: "PixelSums") -> None:
        self.n += other.n
        self.s = [a + b for a, b in zip(self.s, other.s)]
        self.q = [[self.q[i][j] + other.q[i][j] for j in range(3)] for i in range(3)]

    def to_json(self) -> dict:
        return {"n": self.n, "s": self.s, "q": self.q}

    @classmethod
    def from_json(cls, d: dict) -> "PixelSums":
        return cls(int(d["n"]), [int(v) for v in d["s"]], [[int(v) for v in row] for row in d["q"]])


class ImageSum:
    """The exact per-pixel sum of equally sized uint8 images (for the mean image).

    Images are added into a uint16 buffer (a uint8 + uint16 add moves half the bytes of one
    into uint32, and is the cheaper) that is moved into the uint32 total every 257 images:
    257 * 255 = 65535 is the most uint16 holds, so do not raise FLUSH_EVERY."""
    FLUSH_EVERY = 257

    def __init__(self, shape: tuple[int, ...]):
        self._total = np.zeros(shape, np.uint32)
        self._part = np.zeros(shape, np.uint16)
        self._count = 0

    def add(self, arr: np.ndarray) -> None:
        np.add(self._part, arr, out=self._part)
        self._count += 1
        if self._count == self.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        self._total += self._part
        self._part[...] = 0
        self._count = 0

    def total(self) -> np.ndarray:
        """uint32 per-pixel sums of every image added (exact below 16.8M images)."""
        self._flush()
        return self._total.copy()


def _sign_fix(vecs: np.ndarray) -> np.ndarray:
    """Eigenvectors have no sign; make each column's largest-magnitude entry positive so the
    output is reproducible (the first eigen-colour, brightness, comes out all-positive)."""
    vecs = vecs.copy()
    for i in range(vecs.shape[1]):
        if vecs[np.argmax(np.abs(vecs[:, i])), i] < 0:
            vecs[:, i] = -vecs[:, i]
    return vecs


def finalize(sums: PixelSums) -> dict:
    """stats.json's content: pixels, mean, std, cov, eigval (descending), eigvec (columns)."""
    n = sums.n
    if n == 0:
        raise ValueError("no training pixels: every training image was skipped")
    mean = [s / n for s in sums.s]
    cov = np.array([[(n * sums.q[i][j] - sums.s[i] * sums.s[j]) / (n * n) for j in range(3)]
                    for i in range(3)], dtype=np.float64)
    vals, vecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], _sign_fix(vecs[:, order])
    return {
        "pixels": n,
        "mean": mean,
        "std": [float(np.sqrt(cov[i, i])) for i in range(3)],
        "cov": cov.tolist(),
        "eigval": vals.tolist(),
        "eigvec": vecs.tolist(),
    }
