"""The paper's two-tower AlexNet, its LRN and its placement on one or two devices.

    from model import AlexNet, AlexNetConfig, local_response_norm
    net = AlexNet(AlexNetConfig()).place(["cuda:0", "cuda:1"])
"""
from .alexnet import AlexNet, Tower
from .config import AlexNetConfig
from .lrn import local_response_norm
from .placement import Placement

__all__ = ["AlexNet", "AlexNetConfig", "Placement", "Tower", "local_response_norm"]
