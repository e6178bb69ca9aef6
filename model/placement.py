"""Where the towers live, and the only places activations cross between them.

The paper put one tower on each of two GPUs; they talk only at conv3's input and at the
fully connected layers' inputs. ``Placement`` knows the device of each tower and does those
transfers; the network's maths (model/alexnet.py) never names a device.

    Placement.parse(["cuda:0", "cuda:1"], towers=2)  # tower i on device i: split forward
    Placement.parse(["cpu", "cpu"], towers=2)        # split forward, transfers are no-ops
    Placement.parse(["cuda:0"], towers=2)            # both towers fused into grouped ops

One device in the list means the towers share it and the forward may fuse them into
grouped convolutions (same maths, fewer kernels); a device per tower means each tower runs
separately. On CUDA every op and copy below is asynchronous, so listing tower 0's work and
then tower 1's lets the two GPUs run at the same time; autograd runs each device's
backward on its own thread, so the backward overlaps too. The input crosses once per step,
in the autocast dtype under autocast and on a side stream (``scatter``); the activations
cross at conv3, fc6, fc7 and fc8 on the current streams (each is on the critical path, and
autograd copies their gradients back).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from common.devices import parse_device

DeviceLike = str | torch.device


@dataclass(frozen=True)
class Placement:
    devices: tuple[torch.device, ...]  # one per tower; devices[0] also holds fc8 and the input
    fused: bool                        # towers share one device and run as grouped ops

    @staticmethod
    def parse(devices: Sequence[DeviceLike] | DeviceLike, towers: int) -> "Placement":
        if isinstance(devices, (str, torch.device)):
            devices = [devices]
        checked = tuple(parse_device(d) for d in devices)
        if len(checked) == 1:
            return Placement(checked * towers, fused=True)
        if len(checked) != towers:
            raise ValueError(f"place() got {len(checked)} devices for a {towers}-tower net; "
                             f"give 1 (shared) or {towers} (one per tower)")
        return Placement(checked, fused=False)

    @property
    def input_device(self) -> torch.device:
        return self.devices[0]

    def scatter(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The whole input to every tower (each tower's conv1 sees the whole image).

        Under autocast the input is first cast to the autocast dtype, which conv1 would do on
        every device anyway (the same numbers: autocast's cast of an already-cast tensor is a
        no-op), so half the bytes cross and tower 0 casts once. A copy to another GPU runs on
        a side stream of the input's GPU (``_cross``): tower 0's first kernels do not queue
        behind it."""
        kind = x.device.type
        # the tensors autocast casts: float32/16/bf16, never float64
        if torch.is_autocast_enabled(kind) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = x.to(torch.get_autocast_dtype(kind))
        return [x if d == x.device else _cross(x, d) for d in self.devices]

    def exchange(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every tower gets all towers' activations, concatenated on channels in tower order."""
        return [torch.cat([_to(p, d) for p in parts], dim=1) for d in self.devices]

    def gather(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """All towers' activations concatenated on the input device (for fc8)."""
        return torch.cat([_to(p, self.input_device) for p in parts], dim=1)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # non_blocking: a GPU-to-GPU copy is queued on the streams, the host does not wait.
    return t if t.device == device else t.to(device, non_blocking=True)


def _cross(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. From a GPU: the copy is queued on a side stream of t's GPU, after
    the work that wrote t, instead of on t's GPU's current stream, where every later kernel
    of that GPU (tower 0's conv1) would wait for it. torch's cross-device copy makes the
    destination's current stream wait for the copy, so tower 1 reads a complete tensor.
    For tensors that need no gradient (the input): autograd would replay a copy of a
    gradient on whichever stream the forward used."""
    if t.device.type != "cuda" or t.requires_grad:
        return _to(t, device)
    side = torch.cuda.Stream(t.device)            # from torch's per-device stream pool
    side.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(side):
        out = t.to(device, non_blocking=True)
    # t's memory belongs to its stream's allocator: without this it could be handed out again
    # (and overwritten) while the side stream still reads it
    t.record_stream(side)
    return out
