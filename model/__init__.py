"""The paper's two-tower AlexNet, its LRN and its placement on one or two devices.

    from model import AlexNet, AlexNetConfig, local_response_norm
    net = AlexNet(AlexNetConfig()).place(["cuda:0", "cuda:1"])

``model.config`` (AlexNetConfig) imports no torch, so command lines can list the model's
switches without loading it; the torch modules load on first use of their names.
"""
from importlib import import_module

from .config import AlexNetConfig

_LAZY = {"AlexNet": ".alexnet", "Tower": ".alexnet", "local_response_norm": ".lrn", "Placement": ".placement"}

__all__ = ["AlexNet", "AlexNetConfig", "Placement", "Tower", "local_response_norm"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
