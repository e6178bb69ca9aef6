"""The LRN's hand-written backward and its fused (compiled) maths, against the paper's
formula written as a loop and differentiated by autograd; what backward keeps alive."""
from __future__ import annotations

import pytest
import torch

from model import local_response_norm


def lrn_formula(a: torch.Tensor, size=5, alpha=1e-4, beta=0.75, k=2.0, groups=1) -> torch.Tensor:
    """The paper's formula, channel by channel within each group, the window clipped at the
    group's edges; plain differentiable torch ops, so autograd gives the reference gradient."""
    n_ch = a.shape[1] // groups
    out = []
    for g in range(groups):
        block = a[:, g * n_ch:(g + 1) * n_ch]
        for i in range(n_ch):
            lo, hi = max(0, i - size // 2), min(n_ch - 1, i + (size - 1) // 2)
            total = sum(block[:, j] ** 2 for j in range(lo, hi + 1))
            out.append(block[:, i] / (k + alpha * total) ** beta)
    return torch.stack(out, dim=1)


def activations(channels=16, seed=1) -> torch.Tensor:
    # alpha * sum a^2 comparable to k (alpha 1e-2 below): the normalisation and its gradient matter
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, 4, 3, generator=g, dtype=torch.float64) * 10


def formats():
    return pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])


def check_against_formula(fuse: bool, fmt, size: int, groups: int) -> None:
    x = activations().contiguous(memory_format=fmt).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    got = local_response_norm(x, size, 1e-2, 0.75, 2.0, groups=groups, fuse=fuse)
    want = lrn_formula(ref, size, 1e-2, 0.75, 2.0, groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got.is_contiguous(memory_format=fmt)
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-10, atol=1e-14)
    assert x.grad.is_contiguous(memory_format=fmt)
    fn = lambda a: local_response_norm(a, size, 1e-2, 0.75, 2.0, groups=groups, fuse=fuse)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(),), fast_mode=True)


@formats()
@pytest.mark.parametrize("size, groups", [(5, 1), (5, 2), (4, 2), (3, 1)])
def test_lrn_forward_and_backward_are_the_formulas(fmt, size, groups):
    check_against_formula(False, fmt, size, groups)


@pytest.mark.slow
@formats()
def test_fused_lrn_forward_and_backward_are_the_formulas(fmt):
    """The compiled maths (what CUDA runs by default) on the CPU's compiler: the same formula."""
    pytest.importorskip("torch._inductor")
    check_against_formula(True, fmt, 5, 2)


def test_a_compiler_failure_falls_back_to_the_eager_maths_with_one_warning(monkeypatch):
    import model.lrn as lrn

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler\nmore detail")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    c = lrn._Compiled()
    monkeypatch.setattr(lrn, "_compiled", lambda: (c.forward, c.backward))
    x = activations().requires_grad_()
    with pytest.warns(UserWarning, match="torch.compile failed .RuntimeError: no C compiler.; using the eager"):
        out = local_response_norm(x, groups=2, fuse=True)
    out.sum().backward()                             # no second warning: the eager maths from now on
    assert c.broken
    torch.testing.assert_close(out, lrn_formula(x.detach(), groups=2), rtol=1e-12, atol=0)


def test_lrn_other_strides_are_normalised_like_contiguous():
    """A view with neither layout (a channel slice of a channels_last tensor) gives the same."""
    x = activations(channels=20).contiguous(memory_format=torch.channels_last)[:, 2:18]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(local_response_norm(x, groups=2), lrn_formula(x, groups=2), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@formats()
def test_lrn_backward_keeps_only_the_input_and_the_float32_sum(dtype, fmt):
    """What autograd keeps from the forward to the backward: the input (its own dtype, the
    same storage, no copy) and s = k + alpha * sum a^2 in float32, nothing else: 6 bytes per
    value for a bf16 input (the output and the power are not kept)."""
    x = (activations().float() * 10).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = local_response_norm(x, groups=2, fuse=False)
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * (x.element_size() + 4)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    assert {t.dtype for t in saved} == {dtype, torch.float32}
    out.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@formats()
def test_gpu_fused_lrn_equals_eager_in_float32_maths(dtype, fmt):
    """CUDA's default (compiled) LRN against the eager one on the same half-precision input:
    both compute in float32 and round once, so they agree to one unit in the last place
    (plus float32's own rounding where dx's two terms cancel to near zero)."""
    x = (torch.randn(4, 96, 27, 27, device="cuda") * 4).relu().to(dtype).contiguous(memory_format=fmt)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused, eager = local_response_norm(a, groups=2), local_response_norm(b, groups=2, fuse=False)
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=fmt)
    g = torch.randn_like(fused)
    fused.backward(g)
    eager.backward(g)
    for got, want in ((fused, eager), (a.grad, b.grad)):
        w = want.float().abs()
        bound = torch.finfo(dtype).eps * w + 1e-6 * w.max()
        assert ((got.float() - want.float()).abs() <= bound).all()


def test_bench_lrn_runs_and_names_a_bad_device(capsys):
    from bench.lrn import main
    assert main(["--batch-size", "1", "--repeats", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "ours" in out and "torch" in out and "kept for backward" in out
    assert main(["--device", "cuda:9"]) == 2
    assert "cuda:9" in capsys.readouterr().err
