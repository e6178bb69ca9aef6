"""engine.precision: autocast per amp mode, and fp16's gradient scaler (skips, resume)."""
from __future__ import annotations

import pytest
import torch

from engine.precision import Precision


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 2)
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)


def train(net, opt, precision, steps, start=0, poison=()):
    """``steps`` steps; the steps in ``poison`` get an inf gradient (the loss times inf)."""
    flags = []
    for i in range(start, start + steps):
        x, y = batch(i)
        with precision.autocast():
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        if i in poison:
            loss = loss * float("inf")
        opt.zero_grad(set_to_none=True)
        precision.backward(loss)
        flags.append(bool(precision.step(opt)))
    return flags


@pytest.mark.parametrize("amp,dtype", [("none", torch.float32), ("bf16", torch.bfloat16),
                                       ("fp16", torch.float16)])
def test_autocast_dtype(amp, dtype):
    p = Precision(amp, "cpu")
    with p.autocast():
        out = torch.randn(3, 4) @ torch.randn(4, 5)
    assert out.dtype == dtype
    assert (p.scaler is not None) == (amp == "fp16")


def test_fp16_skips_a_step_with_inf_gradients_and_halves_the_scale():
    net, opt = tiny()
    p = Precision("fp16", "cpu")
    assert p.scale == 2.0 ** 16
    before = [t.detach().clone() for t in net.parameters()]
    assert train(net, opt, p, 1, poison={0}) == [True]
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))   # untouched
    assert p.scale == 2.0 ** 15
    assert train(net, opt, p, 1, start=1) == [False]
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_fp16_step_equals_the_fp32_step_when_nothing_overflows():
    """Scaling by 2^16 and unscaling is exact (a power of two): the same update as fp32
    for a net whose forward autocast leaves in float32 anyway (no fp16 op on CPU here)."""
    (a, oa), (b, ob) = tiny(), tiny()
    train(a, oa, Precision("fp16", "cpu"), 3)
    train(b, ob, Precision("none", "cpu"), 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=2e-3, atol=2e-3)   # fp16 matmul in the forward


def test_fp16_resume_equals_uninterrupted():
    """The scaler's state travels in state_dict: a run cut after a skip and resumed from the
    checkpoint takes the same steps, with the same scale, as the uninterrupted run."""
    poison = {1, 4}
    net, opt = tiny()
    whole = Precision("fp16", "cpu")
    flags = train(net, opt, whole, 6, poison=poison)
    assert flags == [i in poison for i in range(6)]

    net2, opt2 = tiny()
    first = Precision("fp16", "cpu")
    train(net2, opt2, first, 3, poison=poison)
    saved = {"net": net2.state_dict(), "opt": opt2.state_dict(), "precision": first.state_dict()}
    net3, opt3 = tiny(seed=1)
    net3.load_state_dict(saved["net"])
    opt3.load_state_dict(saved["opt"])
    resumed = Precision("fp16", "cpu")
    resumed.load_state_dict(saved["precision"])
    assert resumed.scale == 2.0 ** 15
    assert train(net3, opt3, resumed, 3, start=3, poison=poison) == flags[3:]
    assert resumed.scale == whole.scale == 2.0 ** 14
    for pa, pb in zip(net.parameters(), net3.parameters()):
        assert torch.equal(pa, pb)
    fresh = Precision("fp16", "cpu")    # without the state: a fresh scale, a different run
    assert fresh.scale != resumed.scale


def test_bf16_and_none_never_skip_and_carry_no_scaler_state():
    for amp in ("none", "bf16"):
        net, opt = tiny()
        p = Precision(amp, "cpu")
        assert train(net, opt, p, 2) == [False, False]
        assert p.state_dict()["scaler"] is None and p.scale == 1.0
        p.load_state_dict(Precision("fp16", "cpu").state_dict())   # an fp16 checkpoint: ignored


@pytest.mark.parametrize("kwargs,message", [({"amp": "fp8"}, "amp must be one of"),
                                            ({"device_type": "tpu"}, "device_type")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        Precision(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_gpu_fp16_skips_without_a_host_sync():
    net = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    p = Precision("fp16", "cuda")
    x = torch.randn(8, 4, device="cuda")
    with p.autocast():
        out = net(x)
    assert out.dtype == torch.float16
    p.backward(out.float().sum() * float("inf"))
    skipped = p.step(opt)
    assert skipped.device.type == "cuda" and bool(skipped)
