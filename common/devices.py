"""Devices, each question with one home: which device a string names, and waiting for one.

    from common.devices import HostCopy, parse_device, sync
    dev = parse_device("cuda:1")        # torch.device("cuda", 1), or DeviceError (one line)
    sync([dev])                         # wait for its queued work: before and after a timed span
    copy = HostCopy(losses)             # read later with copy.get(), without draining the queue

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


class HostCopy:
    """A device tensor's values on the host, without making the host wait for the device now.

        copy = HostCopy(torch.stack(losses))   # queued after the work that computes them
        ...                                    # later: more steps queued meanwhile
        values = copy.get()                    # waits only if the device is still behind

    On CUDA the values are copied asynchronously into page-locked host memory on the current
    stream and a CUDA event is recorded behind the copy; ``ready()`` asks the event, ``get()``
    waits for it (usually long done) and returns the host tensor. A ``.cpu()`` instead waits
    for everything queued so far, so the device runs dry until the host queues more. Reading
    the previous span's copy while the current span runs keeps the device fed. On the CPU the
    values are the tensor itself (a detached clone, so later in-place writes do not show)."""

    def __init__(self, t: torch.Tensor):
        t = t.detach()
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(t.device))
        else:
            self._host, self._event = t.clone(), None

    def ready(self) -> bool:
        """Whether ``get()`` would return without waiting."""
        return self._event is None or self._event.query()

    def get(self) -> torch.Tensor:
        """The values, on the host (waits for the copy if the device has not reached it)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host
