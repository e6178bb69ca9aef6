"""Devices, each question with one home: which device a string names, and waiting for one.

    from common.devices import parse_device, sync
    dev = parse_device("cuda:1")        # torch.device("cuda", 1), or DeviceError (one line)
    sync([dev])                         # wait for its queued work: before and after a timed span

torch is imported here, so prep (which needs no torch) never imports this module.
"""
from __future__ import annotations

from typing import Iterable

import torch

from common.errors import DeviceError


def parse_device(device: str | torch.device) -> torch.device:
    """The torch.device that ``device`` names, with an explicit index for CUDA ("cuda" is the
    current device, normally 0), checked to exist on this machine. Other kinds (mps, xpu) are
    accepted where torch can allocate on them. Raises DeviceError (one line)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r} is not a device; use 'cpu' or 'cuda:N'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {device!r} but no CUDA GPU is visible; use 'cpu'")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(f"device {device!r} does not exist: {count} GPU(s) are visible")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise DeviceError(f"device {device!r} is not available here ({exc})") from None
    return dev


def sync(devices: Iterable[str | torch.device] | str | torch.device) -> None:
    """Wait until every CUDA device in ``devices`` has finished its queued work (kernels and
    copies are asynchronous: without this, a timer or a phase boundary bills GPU work to
    whatever later call happens to block). A no-op for the CPU."""
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    for dev in devices:
        dev = torch.device(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
