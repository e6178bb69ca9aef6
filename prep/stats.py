"""Exact RGB statistics of the training pixels (0-255 scale) and their eigen-decomposition.

Per image we keep integer sums: n (pixels), S = sum x (3 ints) and Q = sum x x^T (3x3 ints)
over its 256x256 RGB pixels (0-255). Integer sums combine exactly in any order, so the result
does not depend on worker count or shard order. Only at the end do we divide, with Python's
correctly rounded int/int division:

    mean = S / n,   cov = (n Q - S S^T) / n^2   (population covariance of 0-255 pixels: 0-255² units)

and decompose cov in float64 (numpy.linalg.eigh). That covariance's eigenvectors and
eigenvalues are what the paper's PCA lighting uses ("eigen-colours").

Speed (this runs once per image, beside the JPEG work). The records writer uses ``add_pil``:
everything comes from 8-bit histograms that PIL computes in C, with no float copy of the image.
A band's histogram h gives S_c = sum v h(v) and Q_cc = sum v^2 h(v); for a pair of bands the
histogram of |x_i - x_j| (ImageChops.difference, exact for 8-bit values) gives
sum (x_i - x_j)^2 = Q_ii + Q_jj - 2 Q_ij, hence Q_ij. All integer arithmetic: exact, and
cheaper in the writer's loop than ``add_image`` (no float copy of the image).
``add_image`` takes a numpy array instead: S and Q come from one float64 BLAS
product of the (4, pixels) matrix [R; G; B; 1] with its transpose. Every product and partial sum
is an integer of at most 65536 * 255^2 < 2^53 (for a 256x256 image), so float64 holds all of them
exactly and the result is exact. tests/test_prep.py checks it against Python-int arithmetic,
including all-255 images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageChops

MAX_PIXELS = (2**53 - 1) // 255**2  # float64 sums stay exact below this (~138M pixels)
_LEVELS = np.arange(256, dtype=np.int64)    # 8-bit values, for histogram dot products
_SQUARES = _LEVELS * _LEVELS                 # int64 sums stay exact below ~1.4e14 pixels
_PAIRS = ((0, 1), (0, 2), (1, 2))


@dataclass
class PixelSums:
    """Exact integer sums over a set of images: n pixels, S (3,), Q (3x3, upper+lower)."""
    n: int = 0
    s: list[int] = field(default_factory=lambda: [0, 0, 0])
    q: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])

    def add_image(self, arr: np.ndarray) -> None:
        """Add one uint8 (H, W, 3) RGB image."""
        n = arr.shape[0] * arr.shape[1]
        if n > MAX_PIXELS:
            raise ValueError(f"image of {n} pixels: float64 sums would not be exact")
        x = np.empty((4, n), np.float64)
        x[:3] = arr.reshape(n, 3).T
        x[3] = 1.0
        m = (x @ x.T).astype(np.int64)  # exact, see module docstring; m[i, 3] = S_i
        self.merge(PixelSums(n, [int(v) for v in m[:3, 3]], [[int(v) for v in row] for row in m[:3, :3]]))

    def add_pil(self, img: Image.Image) -> None:
        """Add one 8-bit RGB PIL image, from its histograms (module docstring); same result as
        ``add_image(np.asarray(img))``, and faster."""
        if img.mode != "RGB":
            raise ValueError(f"add_pil needs an RGB image, got mode {img.mode}")
        hist = np.asarray(img.histogram(), np.int64).reshape(3, 256)
        s, sq = hist @ _LEVELS, hist @ _SQUARES
        q = [[0] * 3 for _ in range(3)]
        for c in range(3):
            q[c][c] = int(sq[c])
        bands = img.split()
        for i, j in _PAIRS:
            diff = ImageChops.difference(bands[i], bands[j])        # |x_i - x_j|, 8-bit
            d2 = int(np.asarray(diff.histogram(), np.int64) @ _SQUARES)
            q[i][j] = q[j][i] = (q[i][i] + q[j][j] - d2) // 2        # always even: exact
        self.merge(PixelSums(img.width * img.height, [int(v) for v in s], q))

    def merge(self, other: "PixelSums") -> None:
        self.n += other.n
        self.s = [a + b for a, b in zip(self.s, other.s)]
        self.q = [[self.q[i][j] + other.q[i][j] for j in range(3)] for i in range(3)]

    def to_json(self) -> dict:
        return {"n": self.n, "s": self.s, "q": self.q}

    @classmethod
    def from_json(cls, d: dict) -> "PixelSums":
        return cls(int(d["n"]), [int(v) for v in d["s"]], [[int(v) for v in row] for row in d["q"]])


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
