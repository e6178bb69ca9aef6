"""Ranks under torch.distributed as torchrun would start them: DDP over the AlexNet replica
keeps parameters identical across ranks, each rank reads disjoint data, and DDP over replicas
that span two devices (the paper's two towers) gives the gradients of one process that sees
the combined batch."""
from __future__ import annotations

import hashlib
import os
import random
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from engine import distributed as D
from engine.config import TrainConfig
from engine.loop import LoopSettings, Precision, StepHooks, StepPlan, train_steps
from engine.recipe import make_optimizer
from engine.session import build_net, new_state
from model import AlexNet, AlexNetConfig


def free_port() -> int:
    """A port free on every interface now (rank 0's store binds them all), drawn below Linux's
    ephemeral range (32768-60999): a port the kernel hands out (bind to 0) can be taken by any
    other process's outgoing connection before rank 0 binds it, seconds later."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def run_ranks(fn, args: tuple, start_method: str = "spawn", timeout: float = 300.0) -> None:
    """Two ranks of ``fn(rank, *args)``; a rank's exception fails the test, and ranks still
    running after ``timeout`` s are killed and fail it (a hang must not stall the suite)."""
    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {timeout:.0f} s: a hang")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


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
                   seed=cfg.seed)
    state, settings = new_state(cfg, info.world), LoopSettings(torch.device("cpu"))
    hooks = StepHooks(precision=Precision("none", torch.device("cpu")))
    train_steps(model, opt, iter(train), state, StepPlan(epoch_batches=2), settings, hooks)
    torch.save({"params": {k: v.detach().clone() for k, v in net.state_dict().items()}, "seen": seen,
                "steps": state.step}, os.path.join(out, f"rank{rank}.pt"))
    D.shutdown(info)


@pytest.mark.slow
def test_two_gloo_ranks_identical_params_disjoint_data(sample_records, tmp_path):
    port = free_port()
    run_ranks(_rank, (2, port, str(sample_records), str(tmp_path)))
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


# --- DDP over two-device replicas -----------------------------------------------------------
# Two ranks, each replica the two-tower net with one tower per device; one step on 2 images per
# rank must give every rank the gradients of a single process on all 4 images (DDP averages the
# ranks' mean-loss gradients; equal local batches make that the mean over the combined batch).

PER_RANK, CLASSES = 2, 4


def _combined_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same 4 images and labels in every process; rank r trains on images [2r, 2r+2)."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2 * PER_RANK, 3, 224, 224, generator=g) * 60.0   # ~ the 0-255 scale minus the mean
    return images, torch.randint(0, CLASSES, (2 * PER_RANK,), generator=g)


def _two_tower_net(towers: list[str]) -> AlexNet:
    torch.manual_seed(11)
    return AlexNet(AlexNetConfig(num_classes=CLASSES, dropout=0.0)).place(towers)


def _grads(net: AlexNet) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def _single_process_grads(net: AlexNet) -> dict[str, torch.Tensor]:
    """The gradients of one process on all 4 images (left out of the net's .grad afterwards)."""
    images, labels = _combined_batch()
    torch.nn.functional.cross_entropy(net(images.to(net.input_device)), labels.to(net.input_device)).backward()
    grads = _grads(net)
    net.zero_grad(set_to_none=True)
    for key, g in grads.items():
        assert g.abs().max() > 0, key                          # every layer of both towers learns
    return grads


def _ddp_rank(rank: int, world: int, port: int, gpus: str, out: str,
              net: AlexNet | None, ref: dict[str, torch.Tensor] | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    info = D.dist_info_from_env()
    devices = D.replica_devices(TrainConfig(gpus=gpus), info, torch.cuda.device_count())
    towers = D.tower_devices(devices, 2)
    # the CPU: one device, so the fused net's list (the split net is built for it above); GPUs: one per tower
    assert towers == ["cpu"] if gpus == "" else len(towers) == 2 and towers[0] != towers[1], towers
    D.init_process_group(info, devices)
    if net is None:             # a spawned GPU rank: its own net, and the reference on its own devices
        net, ref = _two_tower_net(towers), _single_process_grads(_two_tower_net(towers))
    if rank == 1:
        with torch.no_grad():                     # DDP must broadcast rank 0's weights at wrap time
            for p in net.parameters():
                p.mul_(1.5)
    model = D.wrap_ddp(net, info)
    images, labels = _combined_batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    loss = torch.nn.functional.cross_entropy(model(images[mine].to(net.input_device)),
                                             labels[mine].to(net.input_device))
    loss.backward()
    for key, p in net.named_parameters():
        # the same sums in another order: equal up to float rounding
        want = ref[key].to(p.grad.device)
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                   msg=lambda m, key=key: f"rank {rank}, {key}: {m}")
    torch.save({"checked": sorted(ref), "towers": sorted({str(p.device) for p in net.parameters()})},
               os.path.join(out, f"ddp{rank}.pt"))
    D.shutdown(info)


def _check_ddp_equals_combined_batch(gpus: str, out) -> list[dict]:
    """Each rank asserts its gradients equal the single-process ones; returns what each checked."""
    if gpus == "":
        # CPU: build the 60M-parameter net and its reference once, then fork the ranks (each gets a copy)
        net = _two_tower_net(["cpu", "cpu"])
        ref = _single_process_grads(net)
        run_ranks(_ddp_rank, (2, free_port(), gpus, str(out), net, ref), start_method="fork")
    else:
        # CUDA cannot be forked: each spawned rank builds its own net and reference from the seed
        run_ranks(_ddp_rank, (2, free_port(), gpus, str(out), None, None))
    return [torch.load(out / f"ddp{r}.pt", weights_only=True) for r in (0, 1)]


def test_ddp_over_two_tower_cpu_replicas_equals_one_process_on_the_combined_batch(tmp_path):
    ranks = _check_ddp_equals_combined_batch("", tmp_path)
    assert ranks[0]["towers"] == ranks[1]["towers"] == ["cpu"]
    # every parameter: 2 towers x (conv1-5, fc6, fc7) x (weight, bias), and fc8's weight and bias
    assert ranks[0]["checked"] == ranks[1]["checked"] and len(ranks[0]["checked"]) == 2 * 7 * 2 + 2
    assert "towers.1.conv1.weight" in ranks[0]["checked"]


@pytest.mark.gpu
def test_ddp_over_two_gpu_replicas_nccl(tmp_path):
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs: two NCCL ranks x two towers")
    ranks = _check_ddp_equals_combined_batch("auto", tmp_path)
    assert ranks[0]["towers"] == ["cuda:0", "cuda:1"] and ranks[1]["towers"] == ["cuda:2", "cuda:3"]
