"""uint8 batches and ``finish``: the float view's lighting and mean, applied on the device.

    train = Loader(records, view="train", dtype=torch.uint8, device="cuda:0")
    for batch, labels in train:                     # batch: U8Batch, labels: int64 (B,)
        images = finish(batch, "cuda:0", torch.float32)   # (B, 3, 224, 224), channels_last

The contract: a uint8 Loader yields ``(U8Batch, labels)`` (``(U8Batch, labels, Draws)`` with
``with_draws``). The U8Batch holds the cut pixels, uint8 HWC, NOT mirrored, and what is left
to do per sample; ``finish`` does it (mirror where the window says so, pixels - mean, cast,
NCHW view) and gives what the float Loader with the same arguments gives, up to float rounding
(docs/design.md derives it). Call it on the training device: the host->device copy then moves
1 byte per pixel instead of 4, and the mirror costs the loader nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import reference as ref
from pipeline.errors import LoaderError

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class U8Batch:
    """One uint8 batch, as the Loader yields it (tensors on the loader's device, except the
    small ``mean``/``window`` of a GPU graph, which DALI computes on the CPU).

    pixels:     uint8 (B, 224, 224, 3), or (B, 10, 224, 224, 3) for "tencrop"; RGB, 0–255,
                window cut, NOT mirrored (``finish`` mirrors the crops whose window says so),
                nothing subtracted. Whoever reads them directly must mirror them itself
                (``mirrored``) to see the view's images.
    mean:       float32 (B, 3), 0–255: subtract per channel (the channel mean minus the
                sample's PCA lighting shift; zeros for mean="pixel" without lighting).
    window:     int64 (B, 3) or (B, 10, 3): (y, x, mirror) of each crop in the 256×256 image;
                mirror 1: the view's column j is the pixels' column 223 - j.
    mean_image: float32 (256, 256, 3), 0–255, for mean="pixel" (cut with ``window``), else None.
    """
    pixels: torch.Tensor
    mean: torch.Tensor
    window: torch.Tensor
    mean_image: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pixels.shape[0]


def finish(batch: U8Batch, device: str | torch.device | None = None,
           dtype: torch.dtype = torch.float32, channels_last: bool = True) -> torch.Tensor:
    """The float view of ``batch`` on ``device`` (default: where the pixels are): (B, 3, 224,
    224) — (B, 10, 3, 224, 224) for "tencrop" — mirrored as ``batch.window`` says, 0–255 minus
    the mean, in ``dtype``.

    channels_last=True returns the NCHW view of an NHWC buffer (torch.channels_last for 4-D,
    the same strides per crop for 5-D): no copy. False: contiguous NCHW."""
    if dtype not in FLOATS:
        raise LoaderError(f"finish: dtype must be one of {', '.join(map(str, FLOATS))}, got {dtype}")
    device = batch.pixels.device if device is None else torch.device(device)
    pixels = batch.pixels.to(device, non_blocking=True)
    mean = batch.mean.to(device, torch.float32, non_blocking=True)
    window = batch.window.to(device, non_blocking=True)
    # (B, 3) -> (B, 1, 1, 3) or (B, 1, 1, 1, 3): one mean per sample, shared by its crops
    subtract = mean.view(mean.shape[0], *([1] * (pixels.dim() - 2)), 3)
    if batch.mean_image is not None:   # in the view's (mirrored) columns, like the output
        subtract = mean_windows(batch.mean_image.to(device, torch.float32), window) + subtract
    if channels_last:
        out = torch.empty(pixels.shape, dtype=dtype, device=device)
        _subtract(pixels, window[..., 2], subtract, out)
        return out.movedim(-1, -3)
    out = torch.empty((*pixels.shape[:-3], 3, ref.CROP, ref.CROP), dtype=dtype, device=device)
    _subtract(pixels, window[..., 2], subtract, out.movedim(-3, -1))
    return out


def _subtract(pixels: torch.Tensor, mirror: torch.Tensor, subtract: torch.Tensor,
              out: torch.Tensor) -> None:
    """out = pixels (columns reversed where ``mirror`` is set) - subtract, computed in float32,
    rounded once to out's dtype. pixels and out (..., 224, 224, 3), mirror (...).

    The mirror is one uint8 gather (1 byte read and written per value; skipped when no crop
    is mirrored and the flags are on the host): one parallel op, where a loop over crops
    would pay a thread-pool barrier per crop on the CPU. On a GPU one kernel then reads the
    uint8 and writes the result (5 bytes per value in float32). On the CPU torch's
    mixed-dtype broadcast kernel is not vectorised: widening first and subtracting in place
    runs vectorised kernels only, so the CPU takes two passes."""
    if mirror.device.type != "cpu" or bool(mirror.any()):
        pixels = mirrored(pixels, mirror)
    if out.device.type == "cuda":
        torch.sub(pixels, subtract, out=out)
    else:
        out.copy_(pixels).sub_(subtract)


def mirrored(pixels: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 224, 224, 3) with the columns of each crop whose ``mirror`` (...) is set
    reversed (column j = column 223 - j): the view's pixels from a U8Batch's ``pixels`` and
    ``window[..., 2]``. A new tensor; ``pixels`` is left as it is."""
    step = torch.arange(ref.CROP, device=pixels.device)
    cols = torch.where(mirror.to(pixels.device)[..., None] != 0, (ref.CROP - 1) - step, step)
    return pixels.gather(-2, cols[..., None, :, None].expand(pixels.shape))


def mean_windows(mean_image: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """float32 (..., 224, 224, 3): the 224×224 window (y, x) of the (256, 256, 3) mean image
    for each crop, mirrored where the crop was (output column j is window column 223 - j)."""
    y, x, mirror = window.long().unbind(-1)
    step = torch.arange(ref.CROP, device=mean_image.device)
    rows = y[..., None] + step
    cols = torch.where(mirror[..., None] != 0, x[..., None] + (ref.CROP - 1) - step, x[..., None] + step)
    return mean_image[rows[..., :, None], cols[..., None, :]]


def fixed_windows(view: str) -> torch.Tensor:
    """(y, x, mirror) of the val views' crops: (3,) for "center", (10, 3) for "tencrop"
    (reference.TEN_CROP_WINDOWS, unflipped then flipped, as graphs builds them)."""
    if view == "center":
        half = ref.MAX_OFFSET // 2
        return torch.tensor([half, half, 0])
    return torch.tensor([(y, x, flip) for flip in (0, 1) for (y, x) in ref.TEN_CROP_WINDOWS])
