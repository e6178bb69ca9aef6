"""Two CPU ranks under torch.distributed (gloo), as torchrun would start them: DDP over the
AlexNet replica keeps parameters identical across ranks, and each rank reads disjoint data."""
from __future__ import annotations

import hashlib
import os
import socket

import torch
import torch.multiprocessing as mp

from engine import distributed as D
from engine.config import TrainConfig
from engine.loop import LoopSettings, Precision, StepHooks, StepPlan, to_device, train_steps
from engine.recipe import make_optimizer
from engine.run import build_net, epoch_seed, new_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


def _rank(rank: int, world: int, port: int, records: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pipeline import Loader
    info = D.dist_info_from_env()
    cfg = TrainConfig(gpus="", towers=1, dropout=0.0, batch_size=2, seed=5)
    devices = D.replica_devices(cfg, info, visible=0)
    D.init_process_group(info, devices)
    # which images does this rank see? the centre view of the train split, unaugmented
    seen = [_digest(img) for images, _ in Loader(records, split="train", view="center", batch_size=8,
                                                  shard=(info.rank, info.world)) for img in images]
    torch.manual_seed(100 + rank)                       # ranks start from different weights on purpose:
    net = build_net(cfg, 4, devices)                   # build_net reseeds from cfg.seed ...
    if rank == 1:
        with torch.no_grad():
            next(net.parameters()).add_(1.0)           # ... and DDP must broadcast rank 0's anyway
    model = D.wrap_ddp(net, info)
    opt = make_optimizer(net, cfg)
    train = Loader(records, split="train", view="train", batch_size=2, shard=(info.rank, info.world),
                   seed=epoch_seed(cfg.seed, 0))
    state, settings = new_state(cfg, info.world), LoopSettings(torch.device("cpu"))
    hooks = StepHooks(prepare=lambda b: to_device(b, settings), precision=Precision("none", torch.device("cpu")))
    train_steps(model, opt, iter(train), state, StepPlan(epoch_batches=2), settings, hooks)
    torch.save({"params": {k: v.detach().clone() for k, v in net.state_dict().items()}, "seen": seen,
                "steps": state.step}, os.path.join(out, f"rank{rank}.pt"))
    D.shutdown(info)


def test_two_gloo_ranks_identical_params_disjoint_data(sample_records, tmp_path):
    port = _free_port()
    mp.spawn(_rank, args=(2, port, str(sample_records), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 2
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
    # each rank sees its own half of the records, together all of them, none twice
    from pipeline import Loader
    everything = [_digest(img) for images, _ in Loader(sample_records, split="train", view="center",
                                                        batch_size=8) for img in images]
    assert set(r0["seen"]).isdisjoint(r1["seen"])
    assert sorted(r0["seen"] + r1["seen"]) == sorted(everything)
    # and the training moved the weights away from the initialisation of rank 0
    init = build_net(TrainConfig(gpus="", towers=1, dropout=0.0, seed=5), 4, ["cpu"]).state_dict()
    assert any(not torch.equal(init[k], r0["params"][k]) for k in init)
