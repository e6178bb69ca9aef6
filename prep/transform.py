"""Image bytes -> the paper's 256x256 RGB record image, and back to JPEG bytes.

The paper: "we down-sampled the images to a fixed resolution of 256x256. Given a rectangular
image, we first rescaled the image such that the shorter side was of length 256, and then
cropped out the central 256x256 patch". We do that geometry in one resampling step: the central
square of side min(w, h) (offset rounded down to a whole source pixel, as torchvision's
CenterCrop rounds) is resampled to 256x256, with the filter chosen by direction:

- shrinking (side > 256, ~90% of ImageNet): OpenCV's INTER_AREA, true area averaging: each
  output pixel is the mean of the source area it covers, fractional pixels weighted by their
  covered fraction (what FFCV's writer uses). Pillow's BOX is NOT this at non-integer factors:
  it gives each source pixel weight 0 or 1, so at ImageNet's usual 1.2-1.5x shrink fine
  texture aliases.
- enlarging (side < 256, ~10% of ImageNet): OpenCV's INTER_CUBIC, a smooth interpolation
  (INTER_AREA and BOX repeat pixels when enlarging: visible blocks).

Do not swap in Pillow's BOX or nearest-neighbour filters: the records' measured quality
(docs/records.md, BENCHMARKS.md) and the tests against an antialiased reference depend on them.

Speed without quality loss: a JPEG whose shorter side is at least 4x the target (>= 1024 px)
is decoded with libjpeg's DCT-domain scaling (PIL ``draft``) by 1/2, 1/4 or 1/8, but never below
2x the target (512 px on the shorter side), so the final area-averaging resample still has at least
2 source pixels per output pixel. Typical ImageNet photos (500x375) are below that and are
decoded at full size. ``resize_center`` is what the writer uses AND what the stats test uses,
so stats.json describes exactly these pixels (before JPEG encoding).

Colour: any mode PIL reads becomes 8-bit RGB (CMYK, grayscale, palette, 16-bit, alpha dropped).
EXIF orientation is ignored, as torchvision's ImageFolder and the ImageNet tools do.
"""
from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image

# OpenCV's own thread pool must stay off: the writer forks one worker process per core, and a
# child forked after the parent used OpenCV's threads can hang in its first cv2.resize.
cv2.setNumThreads(1)

SIZE = 256              # record side (pixels)
DRAFT_FACTOR = 2        # JPEG DCT scaling keeps the shorter side >= DRAFT_FACTOR * SIZE
SHRINK = cv2.INTER_AREA      # true area averaging (see the module docstring)
ENLARGE = cv2.INTER_CUBIC    # smooth interpolation for photos with a shorter side < SIZE
RESAMPLE_NAME = "cv2-area-shrink+cubic-enlarge"  # recorded in meta.json params: changing it rebuilds


class ImageError(Exception):
    """The bytes are not an image PIL can decode completely (zero-byte, non-image, truncated)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; 16-bit and 32-bit integer grey are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)  # 0-65535 -> 0-255
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "I":  # 32-bit ints: PIL opens 16-bit PNGs this way
        arr = np.asarray(img)
        shift = 8 if arr.max(initial=0) > 255 else 0
        grey = np.clip(arr >> shift, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _draft(img: Image.Image, size: int) -> None:
    """Ask libjpeg to decode big JPEGs scaled down (never below DRAFT_FACTOR * size on the
    shorter side); the decoded image keeps the aspect ratio to within a pixel."""
    w, h = img.size
    if img.format != "JPEG" or min(w, h) < 2 * DRAFT_FACTOR * size:
        return
    keep = DRAFT_FACTOR * size / min(w, h)
    img.draft(None, (math.ceil(w * keep), math.ceil(h * keep)))


def resize_center(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """The record image: uint8 (size, size, 3) RGB, central square of ``img`` resampled.

    ``img`` must be freshly opened (not loaded) for the JPEG draft shortcut to apply.
    """
    _draft(img, size)
    arr = np.asarray(_to_rgb(img), dtype=np.uint8)
    return resize_center_array(arr, size)


def resize_center_array(arr: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Central square of a uint8 (h, w, 3) array resampled to (size, size, 3), filter by direction."""
    h, w = arr.shape[:2]
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    square = arr[y0:y0 + side, x0:x0 + side]
    if side == size:
        return np.ascontiguousarray(square)
    out = cv2.resize(square, (size, size), interpolation=SHRINK if side > size else ENLARGE)
    return out


def decode_record(data: bytes, size: int = SIZE) -> np.ndarray:
    """Source file bytes -> uint8 (size, size, 3); ImageError (with a short reason) if undecodable."""
    if not data:
        raise ImageError("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return resize_center(img, size)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (PIL cannot identify it)") from None
    except Exception as exc:  # noqa: BLE001 - malformed files raise OSError, SyntaxError,
        # struct.error, IndexError, ...; any of them means "skip this file", never "stop the run"
        raise ImageError(f"undecodable: {exc.__class__.__name__}: {exc}") from None


def encode_jpeg(img: Image.Image | np.ndarray, quality: int) -> bytes:
    """Baseline (non-progressive) 4:2:0 JPEG, as FFCV's and DALI's tools write them."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img, "RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()
