"""AlexNetConfig: the model's switches, one frozen dataclass validated on construction.

    from model import AlexNet, AlexNetConfig
    net = AlexNet(AlexNetConfig(num_classes=1000, lrn=False))   # the paper's "no LRN" ablation

The defaults are the paper's network. Every field is one of the paper's ablations or
an experiment switch; nothing here knows about data or optimisers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import at_least

INITS = ("paper", "kaiming")


@dataclass(frozen=True)
class AlexNetConfig:
    num_classes: int = field(default=1000, metadata={"help": "classes (fc8 outputs)"})
    lrn: bool = field(default=True, metadata={
        "help": "local response normalisation after conv1 and conv2 (paper: on)"})
    overlap_pool: bool = field(default=True, metadata={
        "help": "overlapping max-pool 3x3 stride 2 (paper); off = 2x2 stride 2"})
    dropout: float = field(default=0.5, metadata={
        "help": "dropout probability on the fc6 and fc7 outputs (0 = off)"})
    towers: int = field(default=2, metadata={
        "help": "2 = the paper's two-tower net; 1 = its single-GPU comparison net",
        "choices": [1, 2]})
    init: str = field(default="paper", metadata={
        "help": "paper = N(0, 0.01^2) weights, biases 1/0 as in the paper; kaiming = He normal",
        "choices": list(INITS)})

    def __post_init__(self) -> None:
        _check_type("num_classes", self.num_classes, int)
        _check_type("lrn", self.lrn, bool)
        _check_type("overlap_pool", self.overlap_pool, bool)
        _check_type("dropout", self.dropout, (int, float))
        _check_type("towers", self.towers, int)
        _check_type("init", self.init, str)
        at_least("num_classes", self.num_classes)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.towers not in (1, 2):
            raise ValueError(f"towers must be 1 or 2, got {self.towers}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")


def _check_type(name: str, value, types) -> None:
    # bool is an int in Python; a bool where a number is meant is almost surely a slip.
    numeric = types is int or (isinstance(types, tuple) and int in types)
    if not isinstance(value, types) or (numeric and isinstance(value, bool)):
        raise ValueError(f"AlexNetConfig.{name} has the wrong type: {value!r}")
