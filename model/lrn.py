"""The paper's local response normalisation (section 3.3).

    b[i] = a[i] / (k + alpha * sum_{j = i - size//2 .. i + size//2, clipped to 0..N-1} a[j]^2) ** beta

with the paper's size=5, alpha=1e-4, beta=0.75, k=2. Note alpha multiplies the SUM of
squares: Caffe and ``torch.nn.LocalResponseNorm`` multiply the MEAN (alpha / size), so the
paper's LRN equals ``torch.nn.LocalResponseNorm(size, alpha=alpha * size, beta, k)``.
Do not "simplify" this to torch's module with the same alpha: that normalises 5x less.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F


def local_response_norm(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 2.0, *, groups: int = 1, fuse: bool | None = None) -> torch.Tensor:
    """Normalise each (N, C, H, W) activation across ``size`` neighbouring channels.

    ``groups`` splits the channels into that many independent blocks (the towers of the
    fused single-device forward: tower 0's kernel 47 has no neighbour in tower 1).
    For an even ``size`` the window is channels i - size//2 .. i + (size-1)//2 (torch's choice).
    Forward and backward are written out by hand (one pow each way), where
    torch.nn.LocalResponseNorm composes pad, avg_pool and several elementwise passes that
    autograd then replays and keeps alive: keep the backward hand-written. Backward keeps
    only the input (its own dtype) and the float32 sum s = k + alpha * sum a^2; the power is
    recomputed from s.

    ``fuse``: run the same maths through ``torch.compile`` so that forward and backward are
    each a few fused kernels (the window sum, power and products in one read of the input).
    None (default): on CUDA when Triton is installed; False: eager torch ops. The compiled
    maths are the formula's too (tests check them against it where a compiler exists).

    Precision: for a bf16/fp16 input (autocast) the sum ``k + alpha * sum a^2``, the power and
    the backward are computed in float32 and only the output (and dx) are rounded back to the
    input's dtype. Must stay so: in bf16, k + alpha*sum ~ 2.006 rounds to 2.0 (spacing 0.0156
    near 2), which erases most of the normalisation of conv1-scale activations.
    """
    _check(x, size, groups)
    args = (size // 2, (size - 1) // 2, float(alpha), float(beta), float(k), groups)
    if fuse is None:
        fuse = x.device.type == "cuda" and _triton_available()
    if not torch.is_grad_enabled():   # inference: no autograd node
        # traced (TorchScript export): plain ops, which torch.jit.trace can save
        forward = _forward_eager if torch.jit.is_tracing() else _maths(bool(fuse))[0]
        with _no_autocast(x):
            return forward(x, *args)[0]
    return _LRN.apply(x, bool(fuse), *args)


class _LRN(torch.autograd.Function):
    """y_i = x_i * s_i^-beta,  s_i = k + alpha * sum_{j in W(i)} x_j^2.

    dL/dx_m = g_m s_m^-beta - 2 alpha beta x_m * sum_{i : m in W(i)} g_i x_i s_i^(-beta-1),
    the sum over the transposed window (the same window when size is odd).
    """

    @staticmethod
    def forward(ctx, x, fuse, front, back, alpha, beta, k, groups):
        with _no_autocast(x):
            out, scale = _maths(fuse)[0](x, front, back, alpha, beta, k, groups)
        ctx.save_for_backward(x, scale)
        ctx.lrn = (fuse, front, back, alpha, beta, groups)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        fuse, front, back, alpha, beta, groups = ctx.lrn
        with _no_autocast(x):
            dx = _maths(fuse)[1](x, scale, grad, front, back, alpha, beta, groups)
        return dx, None, None, None, None, None, None, None


# ---- eager maths: torch ops (a pool or shifted slices for the window sum) ---------------

def _forward_eager(x, front, back, alpha, beta, k, groups):
    """(y in x's dtype, s in float32 or float64)."""
    x32 = _wide(x)
    scale = _window_sum(x32 * x32, groups, front, back).mul_(alpha).add_(k)
    return scale.pow(-beta).mul_(x32).to(x.dtype), scale


def _backward_eager(x, scale, grad, front, back, alpha, beta, groups):
    x32, g32 = _wide(x), _wide(grad)
    # in place wherever a temporary can be reused: at most three float32 temporaries live
    power = scale.pow(-beta)
    ratio = (g32 * x32).mul_(power).div_(scale)                 # g_i x_i s_i^(-beta-1)
    spread = _window_sum(ratio, groups, back, front)            # the transposed window
    del ratio
    dx = spread.mul_(x32).mul_(-2.0 * alpha * beta).addcmul_(g32, power)
    return dx.to(x.dtype)


# ---- compiled maths: the same formula written for the compiler (slices, no layout cases) -----

def _forward_fusable(x, front, back, alpha, beta, k, groups):
    x32 = _wide(x)
    scale = _window_sum_shifts(x32 * x32, groups, front, back) * alpha + k
    return (x32 * scale.pow(-beta)).to(x.dtype), scale


def _backward_fusable(x, scale, grad, front, back, alpha, beta, groups):
    x32, g32 = _wide(x), _wide(grad)
    power = scale.pow(-beta)
    spread = _window_sum_shifts(g32 * x32 * power / scale, groups, back, front)
    return (g32 * power - (2.0 * alpha * beta) * x32 * spread).to(x.dtype)


def _window_sum_shifts(t: torch.Tensor, groups: int, front: int, back: int) -> torch.Tensor:
    """sum_{j = i - front .. i + back, clipped to the group} t_j: zero-padded shifted slices,
    which a compiler fuses into the producer and consumer of ``t`` (any strides)."""
    n, c, h, w = t.shape
    t5 = t.view(n, groups, c // groups, h, w)
    padded = F.pad(t5, (0, 0, 0, 0, front, back))
    cg = c // groups
    total = padded[:, :, 0:cg]
    for offset in range(1, front + back + 1):
        total = total + padded[:, :, offset:offset + cg]
    return total.view(n, c, h, w)


_EAGER = (_forward_eager, _backward_eager)
_FUSABLE = (_forward_fusable, _backward_fusable)


class _Compiled:
    """The fusable maths through torch.compile, compiled on first use (dynamic=True: an epoch's
    last batch or evaluation's batch size needs no recompile). A machine where compiling
    fails (no C compiler for Triton's launcher, an unsupported GPU) gets one warning and the
    eager maths from then on, the same formula: a run must not die for want of a faster path."""

    def __init__(self):
        self.broken = False
        self.forward = self._guard(torch.compile(_forward_fusable, dynamic=True, fullgraph=True), _forward_eager)
        self.backward = self._guard(torch.compile(_backward_fusable, dynamic=True, fullgraph=True), _backward_eager)

    def _guard(self, compiled, eager):
        def run(*args):
            if not self.broken:
                try:
                    return compiled(*args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:   # the compiler's failure, whatever its type
                    self.broken = True
                    warnings.warn(f"LRN: torch.compile failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); using the eager maths")
            return eager(*args)
        return run


@functools.cache
def _compiled() -> tuple:
    """(forward, backward) of the one ``_Compiled`` of this process."""
    c = _Compiled()
    return c.forward, c.backward


@functools.cache
def _triton_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def _maths(fuse: bool) -> tuple:
    """(forward, backward) maths. Inside a compiled model (``--compile``) the fusable maths
    are traced into the model's own graph rather than through a second compile."""
    if not fuse:
        return _EAGER
    return _FUSABLE if torch.compiler.is_compiling() else _compiled()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for a half-precision tensor (same memory format), else the tensor itself."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _no_autocast(x: torch.Tensor):
    """The LRN maths must run in the dtypes chosen above, whatever autocast is active."""
    return torch.autocast(x.device.type, enabled=False)


def _window_sum(t: torch.Tensor, groups: int, front: int, back: int) -> torch.Tensor:
    """sum_{j = i - front .. i + back, clipped to the group} t_j along the channels, as a
    fresh tensor in t's memory format (contiguous or channels_last)."""
    # -1 for the batch, not n * groups: a traced (TorchScript) net keeps any batch size
    _, c, h, w = t.shape
    if t.is_contiguous():
        return _pool_sum(t.view(-1, 1, c // groups, h, w), front, back).view(t.shape)
    if not t.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous()
        return _pool_sum(t.view(-1, 1, c // groups, h, w), front, back).view(t.shape)
    # channels_last: shifted slices added in place keep the layout with no copy; a pool over
    # the channel rows of the NHWC buffer is one pass but runs slower on the CPU
    return _window_sum_slices(t.view(-1, groups, c // groups, h, w), front, back).view(t.shape)


def _window_sum_slices(t5: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Window sum along dim 2 of an (N, G, C, H, W) view, whatever its strides."""
    total = t5.clone()
    cg = t5.shape[2]
    for offset in range(-front, back + 1):
        if offset == 0 or abs(offset) >= cg:
            continue
        if offset > 0:   # channel i gets t[i + offset]
            total[:, :, :-offset] += t5[:, :, offset:]
        else:            # channel i gets t[i - |offset|]
            total[:, :, -offset:] += t5[:, :, :offset]
    return total


def _pool_sum(t5: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Window sum along dim 2 of a contiguous (M, 1, C, H, W) tensor: an average pool that
    divides by 1. The zero padding stands for the missing edge channels (count_include_pad),
    so the result is exactly the clipped sum."""
    size = front + back + 1
    if front == back and t5.shape[2] >= size:   # the pool's own padding: at most half the kernel
        return F.avg_pool3d(t5, (size, 1, 1), stride=1, padding=(front, 0, 0), divisor_override=1)
    return F.avg_pool3d(F.pad(t5, (0, 0, 0, 0, front, back)), (size, 1, 1), stride=1, divisor_override=1)


def _check(x: torch.Tensor, size: int, groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"local_response_norm size must be a positive int, got {size!r}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"local_response_norm: {x.shape[1]} channels do not split into {groups} groups")
