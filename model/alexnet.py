"""The paper's AlexNet (Krizhevsky, Sutskever & Hinton, 2012): two towers, LRN, its init.

    from model import AlexNet, AlexNetConfig
    net = AlexNet(AlexNetConfig()).place(["cuda:0", "cuda:1"])   # or ["cuda:0"], ["cpu"]
    logits = net(images)   # images: float (B, 3, 224, 224) on net.input_device, 0-255 scale minus mean

Input: the paper's pixels, 0-255 scale minus the mean, NOT divided by std; the N(0, 0.01^2)
init assumes that scale. Sizes per tower (x2 = total): conv1 48x11x11/4 pad 2 -> 55, LRN,
pool -> 27; conv2 128x5x5 pad 2 (own tower's input) -> 27, LRN, pool -> 13; conv3 192x3x3
pad 1 (BOTH towers' input) -> 13; conv4 192 and conv5 128, 3x3 pad 1 (own tower) -> 13,
pool -> 6; fc6, fc7 2048 (both towers' input), dropout on their outputs; fc8 -> classes.

224 vs 227: the paper says 224x224 inputs but (224 - 11)/4 + 1 is not an integer; 55
needs 227. We keep 224 (the crops the paper's data gives) and pad conv1 by 2:
floor((224 + 2*2 - 11)/4) + 1 = 55, the paper's size, with the paper's kernel.

The parameters are per tower (``towers.0.conv1.weight``, ..., ``fc8.weight``) whatever the
placement, so checkpoints move between one device, two devices and the CPU. On one device
the forward concatenates the towers' weights into grouped convolutions (groups=2 exactly
where a layer reads only its own tower), the same maths in fewer, larger kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AlexNetConfig
from .lrn import local_response_norm
from .placement import DeviceLike, Placement

INPUT_SHAPE = (3, 224, 224)      # channels, height, width the net takes
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)   # the paper's n, alpha, beta, k
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")  # paper init: bias 1 here, 0 elsewhere
INIT_STD = 0.01


@dataclass(frozen=True)
class ConvSpec:
    name: str
    kernel: int
    stride: int
    pad: int
    reads: str  # "image": the whole image; "own": own tower only; "all": every tower


CONVS = (ConvSpec("conv1", 11, 4, 2, "image"), ConvSpec("conv2", 5, 1, 2, "own"),
         ConvSpec("conv3", 3, 1, 1, "all"), ConvSpec("conv4", 3, 1, 1, "own"),
         ConvSpec("conv5", 3, 1, 1, "own"))
POOL5_SIZE = 6  # spatial size after the last pool, 6x6


def tower_widths(towers: int) -> tuple[tuple[int, ...], int]:
    """(conv1..conv5 kernels, fc6/fc7 units), per tower.

    Two towers: half of the paper's 96/256/384/384/256 and 4096/4096 each. One tower (the
    paper's single-GPU comparison net): half the kernels of the conv layers, except conv5
    and the fully connected layers, which the paper's footnote keeps at full size so the
    two nets have about the same number of parameters (59,798,312 vs 60,965,224).
    """
    if towers == 2:
        return (48, 128, 192, 192, 128), 2048
    return (48, 128, 192, 192, 256), 4096


class Tower(nn.Module):
    """One GPU's half of the net: conv1..conv5 and its share of fc6 and fc7."""

    def __init__(self, towers: int):
        super().__init__()
        convs, fc = tower_widths(towers)
        in_ch = 3
        for spec, out_ch in zip(CONVS, convs):
            fan_in = in_ch * towers if spec.reads == "all" else in_ch
            setattr(self, spec.name, nn.Conv2d(fan_in, out_ch, spec.kernel, spec.stride, spec.pad,
                                               device="meta"))
            in_ch = out_ch
        # built on "meta" (no memory, no default init): AlexNet allocates and initialises once
        self.fc6 = nn.Linear(towers * convs[-1] * POOL5_SIZE ** 2, fc, device="meta")
        self.fc7 = nn.Linear(towers * fc, fc, device="meta")


# A tap sees each stage's output as a list with one tensor per tower and may return an
# edited list (used by tests and for inspection; see AlexNet.trace).
Tap = Callable[[str, list], list]


class AlexNet(nn.Module):
    def __init__(self, cfg: AlexNetConfig = AlexNetConfig()):
        super().__init__()
        if not isinstance(cfg, AlexNetConfig):
            raise TypeError(f"AlexNet takes an AlexNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.towers = nn.ModuleList(Tower(cfg.towers) for _ in range(cfg.towers))
        self.fc8 = nn.Linear(cfg.towers * tower_widths(cfg.towers)[1], cfg.num_classes, device="meta")
        self._placement = Placement.parse(["cpu"], cfg.towers)
        self.to_empty(device="cpu")
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------
    def layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) for every conv/linear layer, e.g. ("conv2", tower 1's conv2)."""
        named = [(name, getattr(t, name)) for t in self.towers
                 for name in [s.name for s in CONVS] + ["fc6", "fc7"]]
        return named + [("fc8", self.fc8)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, layer in self.layers():
            if self.cfg.init == "paper":
                nn.init.normal_(layer.weight, 0.0, INIT_STD)
                layer.bias.fill_(1.0 if name in BIAS_ONE else 0.0)
            else:  # He et al.: std sqrt(2 / fan_in) for ReLU layers; biases 0
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                layer.bias.zero_()

    # ---- placement --------------------------------------------------------------------
    def place(self, devices: Sequence[DeviceLike] | DeviceLike) -> "AlexNet":
        """Tower i on devices[i] (or all towers on the one device given); fc8 on devices[0]."""
        placement = Placement.parse(devices, self.cfg.towers)
        for tower, device in zip(self.towers, placement.devices):
            tower.to(device)
        self.fc8.to(placement.input_device)
        self._placement = placement
        return self

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def input_device(self) -> torch.device:
        return self._placement.input_device

    def _apply(self, fn, recurse=True):
        # net.to(...) / net.cuda() move every tower to one device: keep the placement honest.
        result = super()._apply(fn, recurse)
        devices = tuple(t.conv1.weight.device for t in self.towers)
        self._placement = Placement(devices, fused=self._placement.fused)
        return result

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._run(x, tap=None)

    def trace(self, x: torch.Tensor, edit: Tap | None = None) -> dict[str, list[torch.Tensor]]:
        """Every stage's output per tower (conv1, pool1, conv2, pool2, conv3, conv4, conv5,
        pool5, fc6, fc7; fc8 = [logits]). ``edit(name, per_tower)`` may replace a stage's
        outputs before the next stage reads them (e.g. perturb tower 0's conv1)."""
        self._check_input(x)
        seen: dict[str, list[torch.Tensor]] = {}

        def tap(name: str, parts: list) -> list:
            parts = edit(name, parts) if edit is not None else parts
            seen[name] = parts
            return parts

        seen["fc8"] = [self._run(x, tap)]
        return seen

    def _run(self, x: torch.Tensor, tap: Tap | None) -> torch.Tensor:
        h = [x] if self._placement.fused else self._placement.scatter(x)
        h = self._stage(h, tap, "conv1", self._conv)
        h = self._stage(h, tap, "pool1", self._norm_pool)
        h = self._stage(h, tap, "conv2", self._conv)
        h = self._stage(h, tap, "pool2", self._norm_pool)
        h = self._exchange(h)                               # conv3 reads both towers
        h = self._stage(h, tap, "conv3", self._conv)
        h = self._stage(h, tap, "conv4", self._conv)
        h = self._stage(h, tap, "conv5", self._conv)
        h = self._stage(h, tap, "pool5", lambda name, lane, a: self._pool(a))
        # fc6 reads both towers; flattening each tower then concatenating is the same
        # order as flattening the (B, 256, 6, 6) concatenation (channel-major).
        h = self._exchange([torch.flatten(a, 1) for a in h])
        h = self._stage(h, tap, "fc6", self._fc)
        h = self._exchange(h)                               # fc7 reads both towers
        h = self._stage(h, tap, "fc7", self._fc)
        return self.fc8(h[0] if self._placement.fused else self._placement.gather(h))

    def _stage(self, h: list, tap: Tap | None, name: str, fn) -> list:
        """Run ``fn`` on every lane: one per tower (split), or one lane of all towers fused
        (lane -1). On CUDA this only queues work, so the towers' GPUs run concurrently."""
        lanes = [-1] if self._placement.fused else range(len(h))
        out = [fn(name, lane, a) for lane, a in zip(lanes, h)]
        return out if tap is None else self._tap_parts(name, out, tap)

    def _exchange(self, h: list) -> list:
        return h if self._placement.fused else self._placement.exchange(h)

    def _layers(self, lane: int, name: str) -> list[nn.Module]:
        """Layer ``name`` of one tower, or (fused lane -1) of every tower, in tower order."""
        return [getattr(t, name) for t in (self.towers if lane < 0 else [self.towers[lane]])]

    def _weights(self, lane: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One tower's weights, or (fused lane) all towers' concatenated in tower order."""
        layers = self._layers(lane, name)
        if len(layers) == 1:
            return layers[0].weight, layers[0].bias
        return torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers])

    def _groups(self, lane: int) -> int:
        return self.cfg.towers if lane < 0 else 1

    def _conv(self, name: str, lane: int, a: torch.Tensor) -> torch.Tensor:
        spec = next(s for s in CONVS if s.name == name)
        weight, bias = self._weights(lane, name)
        groups = self._groups(lane) if spec.reads == "own" else 1
        # in-place ReLU: a convolution's backward needs its input, not its output
        return F.relu(F.conv2d(a, weight, bias, spec.stride, spec.pad, groups=groups), inplace=True)

    def _norm_pool(self, name: str, lane: int, a: torch.Tensor) -> torch.Tensor:
        if self.cfg.lrn:   # LRN within a tower only: groups keeps fused towers apart
            a = local_response_norm(a, **LRN, groups=self._groups(lane))
        return self._pool(a)

    def _pool(self, a: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(a, 3 if self.cfg.overlap_pool else 2, 2)

    def _fc(self, name: str, lane: int, a: torch.Tensor) -> torch.Tensor:
        # Fused lane: one GEMM per tower on the shared input, outputs concatenated in tower
        # order. The same maths as one GEMM with the towers' weights stacked; do not stack
        # them: that copies fc6/fc7's 218 MB of fp32 weights (and splits their gradients
        # back) on every step, which costs more than the second GEMM saves.
        outs = [F.linear(a, m.weight, m.bias) for m in self._layers(lane, name)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        # Dropout on each tower's own outputs, before they are sent: both towers' next
        # layer must see the same dropped neurons (the paper drops the neuron's output).
        return F.dropout(F.relu(out, inplace=True), self.cfg.dropout, self.training)

    def _tap_parts(self, name: str, out: list, tap: Tap) -> list:
        """Hand the tap one tensor per tower (fused: the channel blocks, in tower order)."""
        if not self._placement.fused:
            return list(tap(name, list(out)))
        parts = tap(name, list(out[0].chunk(self.cfg.towers, dim=1)))
        return [torch.cat(parts, dim=1)]

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"AlexNet expects input of shape (B, {', '.join(map(str, INPUT_SHAPE))}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"AlexNet expects a float input (0-255 scale minus mean), got {x.dtype}")
        if x.device != self.input_device:
            raise ValueError(f"AlexNet input is on {x.device} but the net expects it on {self.input_device} "
                             f"(net.input_device)")
