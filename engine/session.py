"""What a run's epochs need, built once: devices, the net, the optimiser, the loaders.

``build_session`` resolves the records, picks this rank's devices, joins the ranks, builds and
places the net (initialised from the seed, the same on every rank) and wraps it for DDP and
torch.compile; ``Session`` holds the result. Nothing in a Session changes while training (the
TrainState does).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from common.system import usable_cores
from model import AlexNet
from pipeline import Loader, LoaderOptions
from records.folder import read_meta
from records.format import DEFAULT_RECORDS, RecordsError

from . import distributed, logs
from .config import TrainConfig
from .loop import LoopSettings
from .precision import Precision
from .recipe import make_optimizer
from .report import Reporter
from .schedule import PlateauSchedule
from .state import TrainState


class RunError(UserError):
    """A run folder, resume or setup problem; one line."""


@dataclass(frozen=True)
class RecordsData:
    """The run's loaders: the training batches (epoch e's order and augmentation fixed by
    (seed, e): the Loader derives both from the pair, ``iter_epoch(e, start)``) and the
    validation views. ``device`` is where DALI runs, ``dtype`` what it yields (uint8: the engine
    finishes the batch on the model's device, see ``loader_placement``).

    Each loader is built once and kept for the run: building one parses every index file and
    builds a DALI graph (seconds on ImageNet), its label cache fills during the first epoch,
    and a kept train loader has the next epoch's first batches decoded during validation."""
    records: Path
    cfg: TrainConfig
    info: distributed.DistInfo
    device: str
    dtype: torch.dtype = torch.float32
    _built: dict = field(default_factory=dict, compare=False, repr=False)

    def train(self, epoch: int) -> Loader:
        return self._loader("train", "train", self.cfg.batch_size, epoch)

    def val(self, view: str) -> Loader:
        batch = max(1, self.cfg.batch_size // 10) if view == "tencrop" else self.cfg.batch_size  # ~batch_size views
        return self._loader("val", view, batch, 0)

    def _loader(self, split: str, view: str, batch: int, epoch: int) -> Loader:
        if (split, view) not in self._built:
            self._built[split, view] = Loader(
                self.records, split=split, view=view, batch_size=batch, device=self.device,
                shard=(self.info.rank, self.info.world), seed=self.cfg.seed, epoch=epoch, dtype=self.dtype,
                mean=self.cfg.mean,
                num_threads=distributed.dali_threads(self.cfg.workers, self.info, usable_cores()),
                options=LoaderOptions(lighting_std=self.cfg.lighting))   # the val views have none
        return self._built[split, view]


def loader_placement(cfg: TrainConfig, model_device: str) -> tuple[str, torch.dtype]:
    """(where DALI runs, what it yields) for --loader-device and the model's input device.

    uint8 whenever the batch must still cross to the model's device (DALI on the CPU: 1 byte
    per value over PCIe instead of 4) or when the model wants channels_last (``finish`` writes
    NHWC directly; the float view would need a copy per batch). ``finish`` gives exactly the
    float view's values. A CPU model keeps the float view under auto: on the CPU, finishing
    is an extra pass over the batch."""
    on_gpu = model_device.startswith("cuda")
    if cfg.loader_device == "gpu" and not on_gpu:
        raise RunError("--loader-device gpu: the model trains on the CPU here (no GPU visible or --gpus '')")
    if cfg.loader_device == "cpu":
        return "cpu", torch.uint8
    if on_gpu:
        return model_device, torch.uint8 if cfg.channels_last else torch.float32
    return "cpu", torch.float32


@dataclass(frozen=True)
class Session:
    """What a run's epochs need, built once: nothing here changes while training (TrainState does)."""
    cfg: TrainConfig
    info: distributed.DistInfo
    devices: list[str]
    out: Path
    say: Reporter
    data: RecordsData              # or anything with .train(epoch) -> a loader with len() and iter_epoch(epoch, start), and .val(view)
    classes: int
    net: nn.Module                 # the AlexNet (placed); checkpoints save its state
    model: nn.Module               # what trains: net, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    settings: LoopSettings
    precision: Precision
    host_group: object = None      # gloo group for per-step agreement between ranks (None: one process)


def resolve_records(cfg: TrainConfig, world: int = 1) -> tuple[Path, int]:
    """The records folder and its number of classes; a missing default gets a hint. Every one
    of the ``world`` ranks validates its own share of the val split, so it needs a record each."""
    records = Path(cfg.records) if cfg.records else DEFAULT_RECORDS
    if not records.exists():
        hint = "" if cfg.records else " (run prep/build_records.py first, or pass --records DIR)"
        raise RecordsError(f"{records}: records folder does not exist{hint}")
    meta = read_meta(records)
    try:   # checked now, not when the first epoch's validation starts hours later
        val = int(meta["counts"]["val"])
    except (KeyError, TypeError, ValueError):
        val = 0
    if val < 1:
        raise RecordsError(f"{records / 'meta.json'}: no validation records (split 'val'); training "
                           "validates every epoch: rebuild with SOURCE/val (or --val-labels)")
    if val < world:
        raise RecordsError(f"{records / 'meta.json'}: {val} validation record(s) for {world} ranks; each rank "
                           "validates its own share: run fewer ranks or add validation images")
    return records, len(meta["classes"])


def setup_devices(cfg: TrainConfig, info: distributed.DistInfo, say: Reporter) -> list[str]:
    devices = distributed.replica_devices(cfg, info, torch.cuda.device_count())
    if devices == ["cpu"]:
        why = "--gpus ''" if cfg.gpus == "" else "no CUDA GPU visible"
        say.line(f"train: {why}: running on the CPU (slow: tens of images/s; see README for GPUs)")
    say.line(distributed.allocation_line(info, devices, cfg.workers, usable_cores()))
    distributed.init_process_group(info, devices)
    return devices


def build_net(cfg: TrainConfig, classes: int, devices: list[str]) -> AlexNet:
    """The AlexNet of the config, initialised from the seed (the same on every rank), placed."""
    torch.manual_seed(cfg.seed)
    net = AlexNet(cfg.model_config(classes))
    net.place(distributed.tower_devices(devices, cfg.towers))
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def build_session(cfg: TrainConfig, info: distributed.DistInfo, say: Reporter, out: Path) -> Session:
    records, classes = resolve_records(cfg, info.world)
    # absolute in the checkpoint and config.json: a resume from another directory finds them
    cfg = replace(cfg, records=str(records.absolute()))
    devices = setup_devices(cfg, info, say)
    if devices[0].startswith("cuda"):
        # let cuDNN time its convolution algorithms for our fixed shapes once and keep the
        # fastest (every step has the same shapes); torchvision's, timm's, FFCV's and DALI's
        # training scripts and our model bench all do this, so bench and run measure the same
        torch.backends.cudnn.benchmark = True
    net = build_net(cfg, classes, devices)
    torch.manual_seed(cfg.seed + 1 + info.rank)   # dropout masks: different per rank
    model = distributed.wrap_ddp(net, info)
    loader_device, dtype = loader_placement(cfg, str(net.input_device))
    return Session(cfg=cfg, info=info, devices=devices, out=out, say=say, classes=classes,
                   data=RecordsData(records, cfg, info, loader_device, dtype), net=net,
                   model=torch.compile(model) if cfg.compile else model,
                   optimizer=make_optimizer(net, cfg),
                   settings=LoopSettings(input_device=net.input_device, amp=cfg.amp, channels_last=cfg.channels_last,
                                         check_every=logs.read_back_every(cfg.log_every)),
                   precision=Precision(cfg.amp, net.input_device.type), host_group=distributed.host_group(info))


def new_state(cfg: TrainConfig, world: int) -> TrainState:
    return TrainState(schedule=PlateauSchedule(lr=cfg.lr, patience=cfg.plateau_patience,
                                               threshold=cfg.plateau_threshold, max_drops=cfg.max_lr_drops),
                      seed=cfg.seed, batch_size=cfg.batch_size, world=world)
