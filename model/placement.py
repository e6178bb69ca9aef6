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
backward on its own thread, so the backward overlaps too.
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
        """The whole input to every tower (each tower's conv1 sees the whole image)."""
        return [_to(x, d) for d in self.devices]

    def exchange(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every tower gets all towers' activations, concatenated on channels in tower order."""
        return [torch.cat([_to(p, d) for p in parts], dim=1) for d in self.devices]

    def gather(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """All towers' activations concatenated on the input device (for fc8)."""
        return torch.cat([_to(p, self.input_device) for p in parts], dim=1)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # non_blocking: a GPU-to-GPU copy is queued on the streams, the host does not wait.
    return t if t.device == device else t.to(device, non_blocking=True)
