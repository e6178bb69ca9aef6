"""The split (one device per tower) path's input crossing: under autocast the input crosses
in the autocast dtype, which changes no number; two "cpu" devices still equal one."""
from __future__ import annotations

import pytest
import torch

from model import AlexNet, AlexNetConfig, Placement


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=g) * 60


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_input_crosses_in_the_autocast_dtype(dtype):
    placement = Placement.parse(["cpu", "cpu"], towers=2)
    x = images(1)
    with torch.autocast("cpu", dtype=dtype):
        parts = placement.scatter(x)
    assert [p.dtype for p in parts] == [dtype, dtype]
    assert all(torch.equal(p, x.to(dtype)) for p in parts)
    assert parts[0] is parts[1]                      # cast once, shared on the same device
    assert all(p is x for p in placement.scatter(x))      # no autocast: the input itself
    x64 = x.double()
    with torch.autocast("cpu", dtype=dtype):        # autocast never casts float64: neither do we
        assert all(p is x64 for p in placement.scatter(x64))


def test_split_net_under_autocast_gives_what_conv1_cast_would():
    """Casting before the crossing is autocast's own cast, done earlier: the split net's
    output and gradients are bit for bit those of the same net given the cast input, and
    close to the fused (one device) net's."""
    torch.manual_seed(0)
    net = AlexNet(AlexNetConfig(num_classes=10, dropout=0.0)).place(["cpu", "cpu"]).train()
    x = images(2)
    results = []
    for given in (x, x.to(torch.bfloat16)):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(given)
        out.float().square().sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    net.place(["cpu"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = net(x)
    assert (fused.float() - out_a.float()).abs().max() <= 0.05 * out_a.float().abs().max() + 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_input_crosses_on_a_side_stream_and_arrives_whole():
    """The copy to the second GPU waits for the kernel that wrote the input (queued on the
    first GPU's stream just before) and the second GPU's stream waits for the copy."""
    placement = Placement.parse(["cuda:0", "cuda:1"], towers=2)
    for _ in range(3):
        x = torch.empty(64, 3, 224, 224, device="cuda:0")
        x.copy_(torch.full_like(x, 7.0)).mul_(2.0)   # still running when the copy is queued
        parts = placement.scatter(x)
        assert parts[1].device == torch.device("cuda:1")
        assert bool((parts[1] == 14.0).all())
