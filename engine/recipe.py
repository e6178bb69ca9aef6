"""The paper's optimiser and loss, mapped onto torch.

The paper (§5) updates every weight w with momentum v and learning rate ε:

    v ← 0.9·v − 0.0005·ε·w − ε·∂L/∂w          w ← w + v

``torch.optim.SGD(momentum=μ, weight_decay=λ)`` (dampening 0, not Nesterov) does

    b ← μ·b + (∂L/∂w + λ·w)                    w ← w − ε·b

Substituting v = −ε·b gives exactly the paper's rule while ε is constant (the first step
agrees too: torch starts b at the first gradient, the paper v at 0). The two differ only
right after an lr drop: the paper's v keeps the old ε's step size and decays by 0.9 per
step, torch rescales the stored momentum to the new ε at once. That transient is a few
dozen steps out of ~450,000; we use torch's form.

Which parameters are decayed: the paper's rule applies to every w, biases included, and
that is the default here. Caffe's bvlc_alexnet (``decay_mult: 0`` on biases, and a doubled
bias lr) exempts biases; ``--no-decay-biases`` gives the exemption (not the doubled lr).
Loss: the paper maximises the multinomial logistic regression objective = cross-entropy
of the softmax over the 1000 logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """Parameters split by whether weight decay applies (1-D tensors are biases here)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decay_biases or param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Momentum and weight decay from the config into every group: the one writer besides
    construction. Must run after ``optimizer.load_state_dict`` on resume, which brings back the
    saved run's values (an explicit ``--momentum``/``--weight-decay`` would otherwise be
    reported as applied and silently ignored). Group 0 is the decayed group (param_groups)."""
    for i, group in enumerate(optimizer.param_groups):
        group["momentum"] = cfg.momentum
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
        # the kernel chosen at construction, not the saved run's (load_state_dict copies the
        # saved groups' "fused"/"foreach" too: a checkpoint from before fused SGD would
        # silently turn it off)
        group["fused"] = optimizer.defaults.get("fused")
        group["foreach"] = optimizer.defaults.get("foreach")
    _start_momentum(optimizer)


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.SGD:
    """SGD with the paper's momentum and weight decay. ``fused`` (None: wherever torch has the
    fused kernel for every parameter's device): one kernel updates all parameters of a device,
    and under fp16 GradScaler hands it the inf flag and the scale as device tensors, so a
    skipped step is skipped on the device with no read-back (the unfused step reads the flag
    to the host every step). Same update rule; float rounding may differ in the last place."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_biases)
    if fused is None:
        fused = fused_sgd_available(model)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused or None)
    _start_momentum(optimizer)
    return optimizer


def _start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give a fused SGD's parameters a zero momentum buffer where they have none.

    Must stay: on its first step torch's fused SGD allocates the buffers uninitialised
    (empty_like) and fills them in the kernel; when GradScaler skips that step (inf/nan
    gradients, likely on fp16's first step at scale 2^16) the kernel does not run and the
    buffers keep whatever memory held, which the next step adds to the weights. A zero
    buffer gives the same update as torch's first step (b = 0.9 * 0 + g = g exactly)."""
    if not optimizer.defaults.get("fused"):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def fused_sgd_available(model: nn.Module) -> bool:
    """torch has the fused SGD kernel for every parameter (floating point, on a device it lists)."""
    try:   # torch's own list (the check SGD(fused=True) applies); private, so guarded
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:
        supported = {"cuda"}
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.is_floating_point() and p.device.type in supported for p in params)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch, computed in float32 even under bf16 autocast."""
    return nn.functional.cross_entropy(logits.float(), labels)
