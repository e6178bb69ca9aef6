"""Which GPUs and how many DALI threads each rank gets, over the layouts users start:
one process, torchrun on one node, torchrun on several nodes (pure functions: no GPU needed)."""
from __future__ import annotations

import pytest
import torch

from engine.config import TrainConfig
from engine.distributed import DeviceError, DistInfo, allocation_line, dali_threads, replica_devices, tower_devices


def ranks(local_world: int, node: int = 0, nodes: int = 1) -> list[DistInfo]:
    """The DistInfo torchrun gives each local rank of one node."""
    return [DistInfo(rank=node * local_world + r, world=nodes * local_world, local_rank=r,
                     local_world=local_world) for r in range(local_world)]


# (GPUs per node, local ranks, --gpus, --gpus-per-replica) -> every local rank's devices, in order
LAYOUTS = [
    # one process
    (0, 1, "auto", None, [["cpu"]]),
    (2, 1, "", None, [["cpu"]]),
    (1, 1, "auto", None, [["cuda:0"]]),
    (2, 1, "auto", None, [["cuda:0", "cuda:1"]]),                    # the paper: a tower per GPU
    (8, 1, "auto", None, [["cuda:0", "cuda:1"]]),                    # one replica uses two of eight
    (2, 1, "0,1", None, [["cuda:0", "cuda:1"]]),
    (2, 1, "1", None, [["cuda:1"]]),
    (4, 1, "3,2", None, [["cuda:3", "cuda:2"]]),                     # the order given is the tower order
    (2, 1, "auto", 1, [["cuda:0"]]),
    # torchrun, auto: each local rank takes visible // local ranks GPUs, at most 2
    (2, 2, "auto", None, [["cuda:0"], ["cuda:1"]]),                  # 2 GPUs, 2 ranks: one GPU each
    (4, 2, "auto", None, [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]),
    (8, 4, "auto", None, [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"], ["cuda:4", "cuda:5"], ["cuda:6", "cuda:7"]]),
    (8, 8, "auto", None, [[f"cuda:{i}"] for i in range(8)]),
    (8, 2, "auto", None, [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]),   # towers cap a replica at 2
    (3, 2, "auto", None, [["cuda:0"], ["cuda:1"]]),                  # an odd GPU stays idle
    (4, 2, "auto", 1, [["cuda:0"], ["cuda:1"]]),
    (0, 2, "auto", None, [["cpu"], ["cpu"]]),                        # gloo ranks on the CPU
    (4, 4, "", None, [["cpu"]] * 4),
    # torchrun, an explicit pool
    (4, 2, "0,1", None, [["cuda:0"], ["cuda:1"]]),
    (4, 2, "2,3,0,1", None, [["cuda:2", "cuda:3"], ["cuda:0", "cuda:1"]]),
    (4, 2, "0,1,2,3", 2, [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]),
]


@pytest.mark.parametrize("visible, local_world, gpus, per, expected", LAYOUTS)
def test_each_local_rank_gets_its_own_devices(visible, local_world, gpus, per, expected):
    cfg = TrainConfig(gpus=gpus, gpus_per_replica=per)
    for node in (0, 1):        # every node of a multi-node run allocates the same way
        got = [replica_devices(cfg, info, visible) for info in ranks(local_world, node, nodes=2)]
        assert got == expected


# (GPUs per node, local ranks, --gpus, --gpus-per-replica) -> the one-line error
ERRORS = [
    (0, 1, "0,1", None, "--gpus '0,1' names GPU 0, but 0 GPU(s) are visible (use --gpus '' for the CPU)"),
    (2, 1, "0,3", None, "--gpus '0,3' names GPU 3, but 2 GPU(s) are visible"),
    (4, 1, "0,1,2", None, "--gpus '0,1,2' names 3 GPUs for one replica; the net has two towers"),
    (2, 4, "auto", None, "4 local ranks need at least one GPU each, but 2 are visible (lower --nproc-per-node)"),
    (4, 2, "0", None, "2 local ranks need at least one GPU each, but --gpus '0' gives 1"),
    (2, 2, "auto", 2, "2 local rank(s) x 2 GPU(s) per replica need 4 GPUs, but 2 are visible"),
    (4, 2, "0,1,2", 2, "2 local rank(s) x 2 GPU(s) per replica need 4 GPUs, but --gpus '0,1,2' gives 3"),
]


@pytest.mark.parametrize("visible, local_world, gpus, per, message", ERRORS)
def test_impossible_layouts_are_one_line_errors(visible, local_world, gpus, per, message):
    cfg = TrainConfig(gpus=gpus, gpus_per_replica=per)
    with pytest.raises(DeviceError) as exc:
        replica_devices(cfg, ranks(local_world)[-1], visible)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


@pytest.mark.parametrize("cores, local_world, nodes, workers, expected", [
    (16, 1, 1, None, 16),
    (16, 4, 1, None, 4),
    (16, 4, 2, None, 4),      # a second node has its own 16 cores: not 16 // 8 = 2
    (64, 8, 4, None, 8),
    (2, 4, 1, None, 1),       # never 0
    (16, 4, 2, 3, 3),         # --workers wins
])
def test_dali_threads_share_the_nodes_cores_among_its_local_ranks(cores, local_world, nodes, workers, expected):
    for info in ranks(local_world, node=nodes - 1, nodes=nodes):
        assert dali_threads(workers, info, cores) == expected


def test_the_start_line_names_devices_and_threads():
    info = ranks(4, node=1, nodes=2)[1]
    line = allocation_line(info, ["cuda:2", "cuda:3"], None, 32)
    assert line == ("train: rank 5/8 (local rank 1 of 4): devices cuda:2, cuda:3; "
                    "8 DALI threads (32 usable cores / 4 local rank(s))")
    assert allocation_line(DistInfo(), ["cpu"], 3, 2) == "train: one process: devices cpu; 3 DALI threads (--workers)"


def test_tower_devices():
    assert tower_devices(["cuda:0"], 2) == ["cuda:0"]      # one device: the fused net
    assert tower_devices(["cpu"], 2) == ["cpu"]
    assert tower_devices(["cuda:0", "cuda:1"], 2) == ["cuda:0", "cuda:1"]
    assert tower_devices(["cpu"], 1) == ["cpu"]


@pytest.mark.parametrize("gpus, visible", [("", 0), ("0", 1), ("auto", 1)])
def test_a_one_device_run_trains_the_fused_net(gpus, visible, monkeypatch):
    """One device (the CPU, or one GPU: ``--gpus 0``) builds the fused net, the towers as grouped
    ops, which is what bench.model times; never two separate towers on the same device. The GPU
    cases build on the CPU: only the placement list is under test."""
    from engine import session as S
    cfg = TrainConfig(gpus=gpus)
    devices = replica_devices(cfg, DistInfo(), visible)
    assert len(devices) == 1
    net = S.build_net(cfg, 10, ["cpu"] if visible else devices)
    assert net.placement.fused and net.placement.devices == (net.input_device,) * 2
    # the fused forward's conv2 is one grouped convolution over both towers' weights: a hook on
    # torch's conv2d sees groups=2 for the towers' own-input layers, never two calls of groups=1
    seen = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: seen.append(k.get("groups", 1)) or real(*a, **k))
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 224, 224))
    assert seen == [1, 2, 1, 2, 2]            # conv1..conv5, each one call for both towers
