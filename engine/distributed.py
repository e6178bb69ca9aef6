"""Devices and torch.distributed: which devices this process's replica uses, and DDP.

One process = one replica of the model-parallel net (its two towers on 1 or 2 devices).
``torchrun --nproc-per-node K`` starts K replicas per node; DistributedDataParallel wraps
the multi-device module with ``device_ids=None`` (required when a module spans devices)
and all-reduces gradients; each rank reads its own 1/world shard of the records.
GPU ranks use NCCL, CPU ranks gloo. Only rank 0 writes files.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from common.errors import DeviceError, UserError

from .config import TrainConfig

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """The rank layout torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(env.get("RANK", "0")), world=world,
                    local_rank=int(env.get("LOCAL_RANK", "0")),
                    local_world=int(env.get("LOCAL_WORLD_SIZE", str(world))))


def replica_devices(cfg: TrainConfig, info: DistInfo, visible: int) -> list[str]:
    """The devices of this rank's replica: ['cuda:0', 'cuda:1'], ['cuda:3'], or ['cpu'].

    The pool is --gpus (default: every visible GPU). One process takes the whole pool (at
    most two GPUs: the net has two towers). Under torchrun the node's local ranks split the
    pool evenly, in local-rank order: each takes ``--gpus-per-replica`` GPUs, by default
    ``pool // local ranks`` capped at 2 (two towers on two GPUs when there are enough, else
    both towers on one). ``visible`` is torch.cuda.device_count(); pure, so testable on CPU.
    """
    ids = cfg.gpu_ids()
    if ids is None:                       # auto: every visible GPU, or the CPU
        ids = list(range(visible))
    if not ids:
        return ["cpu"]
    too_high = [i for i in ids if i >= visible]
    if too_high:
        raise DeviceError(f"--gpus {cfg.gpus!r} names GPU {too_high[0]}, but {visible} GPU(s) are visible"
                          + ("" if visible else " (use --gpus '' for the CPU)"))
    pool = f"--gpus {cfg.gpus!r} gives {len(ids)}" if cfg.gpus != "auto" else f"{len(ids)} are visible"
    if cfg.gpus_per_replica:
        per = cfg.gpus_per_replica
    elif info.local_world == 1 and cfg.gpus != "auto":
        per = len(ids)                    # one process, an explicit list: exactly those GPUs
        if per > 2:
            raise DeviceError(f"--gpus {cfg.gpus!r} names {per} GPUs for one replica; the net has two towers "
                              "(use torchrun --nproc-per-node for more replicas)")
    else:
        per = min(2, len(ids) // info.local_world)
        if per == 0:
            raise DeviceError(f"{info.local_world} local ranks need at least one GPU each, but {pool} "
                              "(lower --nproc-per-node)")
    need = per * info.local_world
    if need > len(ids):
        raise DeviceError(f"{info.local_world} local rank(s) x {per} GPU(s) per replica need {need} GPUs, but {pool}")
    mine = ids[info.local_rank * per:(info.local_rank + 1) * per]
    return [f"cuda:{i}" for i in mine]


def dali_threads(workers: int | None, info: DistInfo, cores: int) -> int:
    """DALI CPU threads for this rank: --workers, or the node's usable cores shared by its
    local ranks (the ranks of a node share its cores; other nodes have their own)."""
    return workers or max(1, cores // info.local_world)


def allocation_line(info: DistInfo, devices: list[str], workers: int | None, cores: int) -> str:
    """One line saying what this rank got, printed at the start of a run."""
    who = (f"rank {info.rank}/{info.world} (local rank {info.local_rank} of {info.local_world})"
           if info.enabled else "one process")
    why = "--workers" if workers else f"{cores} usable cores / {info.local_world} local rank(s)"
    return (f"train: {who}: devices {', '.join(devices)}; "
            f"{dali_threads(workers, info, cores)} DALI threads ({why})")


def tower_devices(devices: list[str], towers: int) -> list[str]:
    """The placement list for model.place: one device per tower when the replica has a device
    per tower (the paper's split), else the one device, which ``Placement.parse`` turns into the
    fused net (the towers as grouped ops: what bench.model times). Must not list one device
    twice: that places two separate towers on the same device, the same maths in twice the
    kernels, slower, and not the net the model bench measures."""
    return devices if towers > 1 and len(devices) == towers else devices[:1]


def init_process_group(info: DistInfo, devices: list[str]) -> None:
    """Join the torchrun group: NCCL when this replica is on GPUs, gloo on the CPU."""
    if not info.enabled:
        return
    backend = "gloo" if devices[0] == "cpu" else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(devices[0]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over the (possibly multi-device) module; device_ids=None as DDP requires for those."""
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=None)


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum a few numbers over all ranks (float64 so counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def host_group(info: DistInfo):
    """A gloo group over all ranks for agreeing on host-side facts (did every rank get its
    batch?) without a device collective, which would make the host wait for the GPU; None
    in one process. Every rank must call this, once, after ``init_process_group``."""
    if not (info.enabled and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


def max_over_ranks(value: int, group) -> int:
    """The largest ``value`` over the ranks of ``group`` (a host all-reduce; ``value`` when None)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def first_error(exc: BaseException | None, group) -> BaseException | None:
    """The lowest rank's ``exc`` (None on a rank that had none), the same on every rank, or None
    if no rank failed: ranks that must fail together raise this one error (same class, same
    line), so none goes on into a collective the others never join. A host all-gather over
    ``group`` (the exceptions are pickled: plain UserError/OSError subclasses); ``exc`` itself
    when ``group`` is None (one process)."""
    return next((e for e in gather_host(exc, group) if e is not None), None)


def gather_host(obj, group) -> list:
    """Every rank's ``obj`` (picklable), in rank order, over the host group: [obj] when None."""
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def fail_together(make: Callable[[], T], group) -> T:
    """``make()`` on every rank, then every rank learns how it went everywhere: a UserError or
    OSError on any rank is raised on every rank (the lowest rank's), so no rank goes on into a
    collective that another has left. One host all-gather over ``group``; ``make()`` alone in
    one process (``group`` None)."""
    result, failure = None, None
    try:
        result = make()
    except (UserError, OSError) as exc:
        failure = exc
    failure = first_error(failure, group)
    if failure is not None:
        raise failure
    return result


def write_on_rank0(write: Callable[[], None], info: DistInfo, group) -> None:
    """``write`` on rank 0 only (only rank 0 writes files), failing together as
    ``fail_together``; the all-gather also holds every rank until the write is done."""
    fail_together(lambda: write() if info.is_main else None, group)


# How gloo's TCP transport reports a peer whose process is gone (killed, crashed, its node
# lost): the collective that was waiting for it raises a plain RuntimeError with one of these.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport")
PEER_LOST_STATUS = 4      # a rank's exit status when another rank vanished mid-run (documented in engine/run.py)


def peer_lost(exc: BaseException, info: DistInfo) -> bool:
    """Whether ``exc`` is a collective failing because another rank of the run is gone."""
    if not info.enabled or not isinstance(exc, RuntimeError):
        return False
    return isinstance(exc, dist.DistError) or any(s in str(exc) for s in PEER_GONE)


def peer_lost_line(info: DistInfo, out, step: int | None = None) -> str:
    """The one line a surviving rank stops with. Which rank vanished: with two ranks the other
    one; with more, gloo names only an address, so 'a peer rank'."""
    who = f"rank {1 - info.rank}" if info.world == 2 else "a peer rank"
    at = f" at step {step}" if step is not None else ""
    resume = (f"python train.py --resume {out}" if out else "python train.py --resume RUN_DIR")
    return (f"error: {who} vanished{at} (its process ended or its connection broke); rank {info.rank} stops "
            f"too, without saving. The run continues from its last checkpoint: {resume} (or the same "
            "command with --auto-resume)")


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:       # a peer already gone: nothing left to tear down with it
            pass
