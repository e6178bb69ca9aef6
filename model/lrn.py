"""The paper's local response normalisation (section 3.3).

    b[i] = a[i] / (k + alpha * sum_{j = i - size//2 .. i + size//2, clipped to 0..N-1} a[j]^2) ** beta

with the paper's size=5, alpha=1e-4, beta=0.75, k=2. Note alpha multiplies the SUM of
squares: Caffe and ``torch.nn.LocalResponseNorm`` multiply the MEAN (alpha / size), so the
paper's LRN equals ``torch.nn.LocalResponseNorm(size, alpha=alpha * size, beta, k)``.
Do not "simplify" this to torch's module with the same alpha: that normalises 5x less.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def local_response_norm(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 2.0, *, groups: int = 1) -> torch.Tensor:
    """Normalise each (N, C, H, W) activation across ``size`` neighbouring channels.

    ``groups`` splits the channels into that many independent blocks (the towers of the
    fused single-device forward: tower 0's kernel 47 has no neighbour in tower 1).
    For an even ``size`` the window is channels i - size//2 .. i + (size-1)//2 (torch's choice).
    Forward and backward are written out by hand (one pow, few passes over memory), where
    torch.nn.LocalResponseNorm composes pad, avg_pool and several elementwise passes that
    autograd then replays: keep the backward hand-written.

    Precision: for a bf16/fp16 input (autocast) the sum ``k + alpha * sum a^2``, the power and
    the backward are computed in float32 and only the output (and dx) are rounded back to the
    input's dtype. Must stay so: in bf16, k + alpha*sum ~ 2.006 rounds to 2.0 (spacing 0.0156
    near 2), which erases most of the normalisation of conv1-scale activations.
    """
    _check(x, size, groups)
    if not torch.is_grad_enabled():   # inference: plain ops, which torch.jit.trace can also save
        with _no_autocast(x):
            x32 = _wide(x)
            return (x32 * _scale(x32, size, float(alpha), float(k), groups).pow(-beta)).to(x.dtype)
    return _LRN.apply(x, size, float(alpha), float(beta), float(k), groups)


def _scale(x: torch.Tensor, size: int, alpha: float, k: float, groups: int) -> torch.Tensor:
    """s_i = k + alpha * sum_{j in W(i)} x_j^2."""
    return _window_sum(x * x, groups, size // 2, (size - 1) // 2).mul_(alpha).add_(k)


class _LRN(torch.autograd.Function):
    """y_i = x_i * s_i^-beta,  s_i = k + alpha * sum_{j in W(i)} x_j^2.

    dL/dx_m = g_m s_m^-beta - 2 alpha beta x_m * sum_{i : m in W(i)} g_i y_i / s_i,
    the sum over the transposed window (the same window when size is odd).
    """

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k, groups):
        front, back = size // 2, (size - 1) // 2
        with _no_autocast(x):
            x32 = _wide(x)
            scale = _scale(x32, size, alpha, k, groups)
            power = scale.pow(-beta)
            out = (x32 * power).to(x.dtype)
        ctx.save_for_backward(x, scale, power)
        ctx.lrn = (front, back, alpha, beta, groups)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, scale, power = ctx.saved_tensors
        front, back, alpha, beta, groups = ctx.lrn
        with _no_autocast(x):
            x32, g32 = _wide(x), _wide(grad)
            # g_i * y_i / s_i with y_i = x_i * power_i
            ratio = (g32 * x32).mul_(power).div_(scale)
            spread = _window_sum(ratio, groups, back, front)        # the transposed window
            dx = spread.mul_(x32).mul_(-2.0 * alpha * beta).addcmul_(g32, power)
        return dx.to(x.dtype), None, None, None, None, None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for a half-precision tensor (same memory format), else the tensor itself."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _no_autocast(x: torch.Tensor):
    """The LRN maths must run in the dtypes chosen above, whatever autocast is active."""
    return torch.autocast(x.device.type, enabled=False)


def _window_sum(t: torch.Tensor, groups: int, front: int, back: int) -> torch.Tensor:
    """sum_{j = i - front .. i + back, clipped to the group} t_j along the channels."""
    # -1 for the batch, not n * groups: a traced (TorchScript) net keeps any batch size
    _, c, h, w = t.shape
    if t.is_contiguous():
        return _window_sum_pool(t.view(-1, 1, c // groups, h, w), front, back).view(t.shape)
    # channels_last (GPU): sum shifted slices, keeps the memory format, no copy
    return _window_sum_slices(t.view(-1, groups, c // groups, h, w), front, back).view(t.shape)


def _window_sum_pool(t5: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Window sum along dim 2 of a contiguous (M, 1, C, H, W) tensor via avg_pool3d.

    The zero padding stands for the missing edge channels; avg_pool3d counts it
    (count_include_pad), so ``size * average`` is exactly the clipped sum.
    """
    size = front + back + 1
    if front == back and t5.shape[2] >= size:   # avg_pool3d's own padding needs C >= size
        avg = F.avg_pool3d(t5, (size, 1, 1), stride=1, padding=(front, 0, 0))
    else:
        avg = F.avg_pool3d(F.pad(t5, (0, 0, 0, 0, front, back)), (size, 1, 1), stride=1)
    return avg.mul_(size)


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


def _check(x: torch.Tensor, size: int, groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"local_response_norm size must be a positive int, got {size!r}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"local_response_norm: {x.shape[1]} channels do not split into {groups} groups")
