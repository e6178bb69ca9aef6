"""common.devices.HostCopy: a device tensor's values read on the host later, without a drain."""
from __future__ import annotations

import pytest
import torch

from common.devices import HostCopy


def test_cpu_copy_holds_the_values_at_the_time_of_the_copy():
    t = torch.tensor([1.5, float("nan"), 3.0])
    copy = HostCopy(t)
    t.fill_(0.0)                                   # a later in-place write does not show
    assert copy.ready()
    got = copy.get()
    assert got.device.type == "cpu" and got[0] == 1.5 and got[2] == 3.0 and got[1].isnan()


@pytest.mark.gpu
def test_gpu_copy_waits_only_for_its_own_values_and_gets_them_whole():
    """The copy is queued behind the kernel that wrote the values; get() returns them once
    the event is reached, while work queued after it may still be running."""
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    values = x[:4] * 2                           # queued
    copy = HostCopy(values)
    assert copy.get().is_pinned() and copy.get().tolist() == [0.0, 2.0, 4.0, 6.0]
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):                          # keep the GPU busy after a second copy
        values = values + 1
        copy = HostCopy(values)
        big = big @ big / 4096
    assert copy.get().tolist() == [20.0, 22.0, 24.0, 26.0]
    torch.cuda.synchronize()
    assert copy.ready()
