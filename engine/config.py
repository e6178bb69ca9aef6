"""TrainConfig: every setting of a training run, typed, validated at parse time.

The defaults are the 2012 paper's recipe (batch 128, SGD momentum 0.9, weight decay
0.0005, lr 0.01 ÷10 on a validation plateau, 90 epochs, the two-tower net with LRN,
overlapping pooling, dropout 0.5 and N(0, 0.01²) init). ``--demo`` swaps in a preset
sized for a few minutes on a 2-core CPU (see ``DEMO`` below for why each value differs);
flags given explicitly on the command line always win over the preset.

    cfg, given = parse_command(["--demo", "--epochs", "3"])   # given == {"demo", "epochs"}
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from common.config import build_parser, check_at_least
from model.config import INITS, AlexNetConfig

_GPU_LIST = re.compile(r"^\d+(,\d+)*$")


def _h(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class TrainConfig:
    # --- data -------------------------------------------------------------------
    records: str | None = field(default=None, metadata=_h(
        "records folder written by prep/build_records.py (default: data/records, its default output)"))
    mean: str = field(default="channel", metadata=_h(
        "mean subtracted from the 0-255 pixels: per-channel RGB mean, or the paper's per-pixel mean image",
        choices=["channel", "pixel"]))
    workers: int | None = field(default=None, metadata=_h(
        "DALI CPU threads per rank; default: the node's usable cores / its local ranks"))
    lighting: float = field(default=0.1, metadata=_h(
        "PCA lighting of the training crops: alpha ~ N(0, this) per image and eigenvector "
        "(the paper: 0.1; 0 = off, the paper's ablation; the crops and mirrors stay the same)"))
    # --- devices ----------------------------------------------------------------
    gpus: str = field(default="auto", metadata=_h(
        "GPU ids for the towers: '0,1' = tower 0 on cuda:0, tower 1 on cuda:1 (DALI on the first); "
        "'0' = both towers on one GPU; '' = CPU; 'auto' = the visible GPUs (CPU if none). "
        "Under torchrun: the pool each node's ranks take --gpus-per-replica ids from, in local-rank order"))
    gpus_per_replica: int | None = field(default=None, metadata=_h(
        "GPUs per model replica (1 or 2); default: the GPUs of --gpus / local ranks, at most 2"))
    # --- the recipe -------------------------------------------------------------
    batch_size: int = field(default=128, metadata=_h(
        "images per step per replica (the paper: 128, one replica spread over two GPUs)"))
    lr: float = field(default=0.01, metadata=_h("initial learning rate ε"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    weight_decay: float = field(default=0.0005, metadata=_h("L2 weight decay λ (the paper: 0.0005)"))
    decay_biases: bool = field(default=True, metadata=_h(
        "apply weight decay to biases too: the paper's rule decays every w; Caffe's bvlc_alexnet "
        "exempts biases (--no-decay-biases)"))
    epochs: int = field(default=90, metadata=_h("epochs to train (the paper: roughly 90)"))
    max_steps: int | None = field(default=None, metadata=_h(
        "stop after this many optimiser steps in total (smoke runs, profiling, a long run in chunks); "
        "a resumed run keeps it: continue with a larger N, or 'none' for no limit"))
    epoch_steps: int | None = field(default=None, metadata=_h(
        "cap on optimiser steps per epoch (smoke runs); default: the whole epoch"))
    warmup_steps: int = field(default=0, metadata=_h(
        "raise the lr linearly from lr/N to lr over the first N steps (0 = none, the paper)"))
    plateau_patience: int = field(default=4, metadata=_h(
        "divide lr by 10 after this many epochs without a better validation top-1 error"))
    plateau_threshold: float = field(default=0.001, metadata=_h(
        "an epoch 'improves' only if its validation top-1 error beats the best by this much (fraction, 0.001 = 0.1 points)"))
    max_lr_drops: int = field(default=3, metadata=_h(
        "divide the lr on a plateau at most this many times (the paper: 3 in ~90 epochs)"))
    seed: int = field(default=0, metadata=_h("seed for weights, dropout and the data order"))
    # --- the model (the paper's ablation switches) ------------------------------
    lrn: bool = field(default=True, metadata=_h("local response normalisation after conv1 and conv2"))
    overlap_pool: bool = field(default=True, metadata=_h("3x3 stride-2 (overlapping) pooling; --no-overlap-pool = 2x2 stride 2"))
    dropout: float = field(default=0.5, metadata=_h("dropout probability on the outputs of fc6 and fc7 (0 = off)"))
    towers: int = field(default=2, metadata=_h(
        "2 = the paper's two-tower net; 1 = its single-GPU comparison net with half the kernels",
        choices=[1, 2]))
    init: str = field(default="paper", metadata=_h(
        "paper = weights N(0, 0.01²) and the paper's 0/1 biases; kaiming = He-normal", choices=list(INITS)))
    # --- speed ------------------------------------------------------------------
    amp: str = field(default="none", metadata=_h(
        "mixed precision: bf16 = autocast (A100/H100-class GPUs); fp16 = autocast plus a gradient "
        "scaler (V100/T4-class GPUs: a step with inf/nan gradients is skipped and the scale halved, "
        "counted as amp_skipped; a NaN/inf loss still stops the run)", choices=["none", "bf16", "fp16"]))
    loader_device: str = field(default="auto", metadata=_h(
        "where DALI decodes and crops for a GPU run: gpu = on the first GPU (nvJPEG, the fastest "
        "when the GPU has room to spare); cpu = on the CPU threads, yielding uint8 crops that cross "
        "to the GPU at 1 byte per value and get their mean subtracted there (frees the GPU for the "
        "model; for many-core hosts or GPUs that the model saturates); auto = gpu when the model "
        "is on a GPU, else the CPU", choices=["auto", "gpu", "cpu"]))
    channels_last: bool = field(default=False, metadata=_h("NHWC memory format for the model and its inputs (GPU speed)"))
    compile: bool = field(default=False, metadata=_h("torch.compile the model"))
    profile: bool = field(default=False, metadata=_h(
        "time each step's data wait / host->device / forward / backward / optimiser, write a Chrome trace "
        "into the run folder, emit NVTX ranges on CUDA, and print a summary table"))
    profile_warmup: int = field(default=50, metadata=_h(
        "--profile: the first N steps of this process (cold loader, cuDNN autotuning, allocator, "
        "and the Chrome trace of steps 1-4: keep N >= 4) count in no rate"))
    profile_window: int = field(default=200, metadata=_h(
        "--profile: after the warm-up, N steps timed end to end with no per-phase syncs (the "
        "unprofiled rate), then the per-phase split; then N steps on one batch already on the "
        "device, on a copy of the model and optimiser (the model's rate inside the loop)"))
    # --- run folder, resume, evaluation -----------------------------------------
    out: str | None = field(default=None, metadata=_h("run folder (default: runs/<UTC timestamp>)"))
    resume: str | None = field(default=None, metadata=_h(
        "continue the run in this folder exactly where its last.pt left off (flags given here override its saved config)"))
    auto_resume: bool = field(default=False, metadata=_h(
        "with --out DIR: continue DIR/last.pt when it exists, else start the run there; one command for "
        "torchrun --max-restarts and schedulers that requeue a job (flags equal to the saved run's change nothing)"))
    eval_only: bool = field(default=False, metadata=_h(
        "only evaluate --checkpoint on the validation set: single-crop and 10-crop error"))
    checkpoint: str | None = field(default=None, metadata=_h("checkpoint for --eval-only: a file, or a run folder (its best.pt)"))
    keep_last_only: bool = field(default=False, metadata=_h(
        "write no best.pt, only last.pt (half the run folder's disk when the best epoch is not the last); "
        "the final table, figures, export and predict then use last.pt"))
    final_eval: bool = field(default=True, metadata=_h(
        "finish with the single-crop vs 10-crop error table on the validation set"))
    progress: bool = field(default=True, metadata=_h("rich progress bars (only when stdout is a terminal)"))
    log_every: int | None = field(default=None, metadata=_h(
        "a plain line every N steps: epoch and batch position, step, mean loss, img/s, lr, ETA of the epoch "
        "and the run (rank 0). Default: every 50 steps when no progress bar shows (stdout not a terminal: "
        "nohup, SLURM, CI; or --no-progress), none under a bar; 0 = never. N < 10 also reads the loss back "
        "every N steps instead of every 10 (a host sync)"))
    tensorboard: bool = field(default=False, metadata=_h(
        "write TensorBoard scalars (loss, errors, lr, img/s, profile phases) and the conv1 kernels per epoch to "
        "RUN_DIR/tensorboard (rank 0; needs the tensorboard package)"))
    demo: bool = field(default=False, metadata=_h(
        "a short CPU run on the built-in sample set that visibly learns (see README); explicit flags override it"))
    preset: str | None = field(default=None, metadata=_h(
        "small = a recipe for your own few thousand photos (see PRESETS in engine/config.py and the README); "
        "explicit flags override it", choices=list(("small",))))

    def __post_init__(self) -> None:
        check_at_least(self, ("batch_size", "epochs", "plateau_patience", "max_steps", "epoch_steps", "workers"))
        check_at_least(self, ("warmup_steps", "max_lr_drops", "log_every", "seed", "profile_warmup",
                              "profile_window"), minimum=0)
        # every float flag: finite and in its range (nan fails no comparison, so test it first)
        _check_range(self, "lr", 0.0, math.inf, low_open=True)
        _check_range(self, "momentum", 0.0, 1.0, high_open=True)
        _check_range(self, "weight_decay", 0.0, math.inf)
        _check_range(self, "dropout", 0.0, 1.0, high_open=True)
        _check_range(self, "lighting", 0.0, math.inf)
        _check_range(self, "plateau_threshold", 0.0, 1.0)
        try:
            self.model_config(num_classes=1)   # the model's own checks of its switches
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None   # its messages start with the field name
        if self.gpus not in ("auto", "") and not _GPU_LIST.match(self.gpus):
            raise ValueError(f"--gpus must be a comma list of GPU ids like '0,1', '' (CPU) or 'auto', got {self.gpus!r}")
        ids = self.gpu_ids()
        if ids is not None and len(set(ids)) != len(ids):
            raise ValueError(f"--gpus names a GPU twice: {self.gpus!r}")
        if self.gpus_per_replica not in (None, 1, 2):
            raise ValueError(f"--gpus-per-replica must be 1 or 2, got {self.gpus_per_replica}")
        if self.loader_device == "gpu" and self.gpus == "":
            raise ValueError("--loader-device gpu needs a GPU; --gpus '' trains on the CPU")
        if self.eval_only and not self.checkpoint:
            raise ValueError("--eval-only needs --checkpoint PATH")
        if self.checkpoint and not self.eval_only:
            raise ValueError("--checkpoint is for --eval-only; use --resume RUN_DIR to continue training")
        if self.eval_only and self.resume:
            raise ValueError("--eval-only and --resume exclude each other")
        if self.auto_resume and not self.out:
            raise ValueError("--auto-resume needs --out DIR (the folder to continue or start)")
        if self.auto_resume and (self.resume or self.eval_only):
            raise ValueError("--auto-resume excludes --resume and --eval-only")

    def model_config(self, num_classes: int) -> AlexNetConfig:
        """The AlexNetConfig these flags describe (the model's switches live in MODEL_FIELDS)."""
        return AlexNetConfig(num_classes=num_classes, **{k: getattr(self, k) for k in MODEL_FIELDS})

    def gpu_ids(self) -> list[int] | None:
        """The GPU ids named by --gpus; None for 'auto', [] for CPU."""
        if self.gpus == "auto":
            return None
        return [int(x) for x in self.gpus.split(",")] if self.gpus else []


def _check_range(cfg: TrainConfig, name: str, low: float, high: float,
                 low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(cfg, name)
    ok = (isinstance(value, (int, float)) and math.isfinite(value)
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        span = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf
                else f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number {span}, got {value}")


# The model's switches, mirrored one-to-one as train.py flags (everything but num_classes,
# which comes from the records); build_net and --eval-only take exactly these.
MODEL_FIELDS = tuple(f for f in AlexNetConfig.__dataclass_fields__ if f != "num_classes")
assert set(MODEL_FIELDS) <= set(TrainConfig.__dataclass_fields__), "a model switch has no train.py flag"


# The --demo preset: AlexNet on the 10 synthetic classes of the built-in sample set (~1,000 train
# images) in a few minutes on a 2-core CPU, where the model trains at tens of images/s instead of
# ImageNet's thousands. Each value says why it differs from the paper.
DEMO: dict[str, Any] = {
    "gpus": "",            # the demo is the CPU walk-through; a GPU run drops --demo
    "towers": 1,           # the paper's single-GPU comparison net: ~3x fewer FLOPs than two towers
    "batch_size": 32,      # ~31 steps per epoch from ~1,000 images, instead of 7 at the paper's 128
    "lr": 0.001,           # batches of 32 at the paper's 0.01 take 4x the paper's step per image;
                           # 0.001 with the warm-up learns the set within the 3 epochs
    "warmup_steps": 30,    # and a linear warm-up tames the first steps' huge fc updates
                           # (the paper's fc biases of 1 make |h|^2 ~ the layer width)
    "dropout": 0.0,        # dropout fights overfitting over 90 epochs; in 3 it only slows learning
    "epochs": 3,           # ~3,000 training images at tens of images/s
    "plateau_patience": 2, # a 3-epoch run has no room to wait 4 epochs for a plateau
}


# --preset small: a real dataset of a few thousand photos (tens to hundreds per class), where
# --demo's values, tuned to the synthetic sample set it learns in 3 epochs, do not fit. Each value
# says why it differs from the paper (or from the demo).
PRESETS: dict[str, dict[str, Any]] = {"small": {
    "batch_size": 32,       # ~40 steps per epoch from 1,200 photos instead of ~10 at 128
    "lr": 0.001,            # batches of 32 at the paper's 0.01: 4x its step per image (as --demo)
    "warmup_steps": 30,     # tames the first steps' large fc updates (as --demo)
    "epochs": 30,           # real photos need more passes than the sample set's colour cue
    "plateau_patience": 5,  # the val error of a few hundred images moves by ~0.5/sqrt(N) by
                            # chance (3 points at 300) each epoch: a patience of 2 read that
                            # noise as a plateau and dropped the lr while training still improved
}}
assert all(set(p) <= set(TrainConfig.__dataclass_fields__) for p in PRESETS.values())


# --help's headings, in this order; every field belongs to one (a test checks).
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("records", "mean", "lighting"),
    "model (the paper's ablation switches)": ("towers", "lrn", "overlap_pool", "dropout", "init"),
    "recipe (the paper's values)": ("batch_size", "lr", "momentum", "weight_decay", "decay_biases", "epochs",
                                    "plateau_patience", "plateau_threshold", "max_lr_drops", "warmup_steps", "seed",
                                    "preset"),
    "speed": ("workers", "loader_device", "amp", "channels_last", "compile", "profile", "profile_warmup",
              "profile_window"),
    "run folder, resume, evaluation": ("out", "resume", "auto_resume", "eval_only", "checkpoint", "keep_last_only",
                                       "final_eval",
                                       "max_steps", "epoch_steps", "progress", "log_every", "tensorboard", "demo"),
    "devices and ranks (torchrun)": ("gpus", "gpus_per_replica"),
}

# The short forms torchvision's and timm's scripts taught users to type.
ALIASES: dict[str, tuple[str, ...]] = {"batch_size": ("-b",), "workers": ("-j",), "weight_decay": ("--wd",)}

METAVARS: dict[str, str] = {"records": "DIR", "out": "DIR", "resume": "RUN_DIR", "checkpoint": "FILE",
                            "gpus": "IDS", "lr": "LR", "weight_decay": "WD", "lighting": "STD"}

# Keys a run's config.json holds besides the flags: what that run resolved (devices, world,
# classes) or where it lived (out, resume, auto_resume: it only means something with that run's
# --out). A new run given --config FILE decides these itself.
RUN_KEYS = frozenset({"out", "resume", "auto_resume", "devices", "world", "classes"})

_FIELDS = tuple(TrainConfig.__dataclass_fields__)
_UNSET = object()


def train_parser(description: str | None = None):
    parser = build_parser(TrainConfig, prog="train.py", description=description,
                          groups=HELP_GROUPS, aliases=ALIASES, metavars=METAVARS,
                          usage="train.py [-h] [--demo] [--records DIR] [--config FILE] [options]")
    parser.add_argument("--config", metavar="FILE", help=(
        "start from a run's config.json (its flags; its run folder, devices and world are not "
        "taken); flags given here win"))
    return parser


def parse_train_args(argv: Sequence[str] | None, description: str | None = None) -> TrainConfig:
    """The TrainConfig of argv (``parse_command`` without the flags given)."""
    return parse_command(argv, description)[0]


def parse_command(argv: Sequence[str] | None, description: str | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """argv, parsed once: (the TrainConfig, the names of the fields whose flags were given).

    The config is the defaults, then --demo's and --preset's values, then --config's file, then the flags
    given explicitly, each level winning over the ones before. A flag counts as given however
    it was spelt ('--lr=0.1', '-b 64'); a resume puts exactly those on top of its saved config.
    Bad values exit with status 2 and one error line (common.config.Parser), like common.config.parse_args.
    """
    parser = train_parser(description or "Train the 2012 paper's AlexNet on DALI-fed records.")
    # argparse fills in a default only where the namespace has no value yet, so a field still
    # _UNSET after parsing had no flag (and --help still shows the real defaults)
    ns = parser.parse_args(argv, namespace=argparse.Namespace(**{name: _UNSET for name in _FIELDS}))
    given = frozenset(name for name in _FIELDS if getattr(ns, name) is not _UNSET)
    values = {name: getattr(ns, name) if name in given else parser.get_default(name) for name in _FIELDS}
    from_file = read_config_file(ns.config, parser) if ns.config else {}
    if from_file and values["resume"]:
        parser.error("--config and --resume exclude each other (a resumed run continues with its own config)")
    values.update({k: v for k, v in from_file.items() if k not in given})
    if values["demo"]:
        values.update({k: v for k, v in DEMO.items() if k not in given and k not in from_file})
    if values["preset"]:       # over --demo's values: --demo --preset small --records MINE
        values.update({k: v for k, v in PRESETS[values["preset"]].items() if k not in given and k not in from_file})
    try:
        return TrainConfig(**values), given
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def read_config_file(path: str, parser) -> dict[str, Any]:
    """The flags of a run's config.json (or any JSON object of TrainConfig fields); one line
    through parser.error (exit 2) when it cannot be read or holds keys no flag has."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        parser.error(f"--config {path}: {getattr(exc, 'strerror', None) or exc}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a JSON object of flags, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TrainConfig.__dataclass_fields__) - RUN_KEYS)
    if unknown:
        parser.error(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    return {k: v for k, v in data.items() if k not in RUN_KEYS}


def merge_explicit(saved: TrainConfig, cfg: TrainConfig, given: frozenset[str]) -> tuple[TrainConfig, list[str]]:
    """The saved config of a resumed run with the flags given now (``given``, their values in
    ``cfg``) applied on top. Returns the merged config and 'name: old -> new' lines for the user.
    """
    names = given - {"resume", "auto_resume", "out", "demo"}
    changes = {n: getattr(cfg, n) for n in sorted(names) if not _same(n, getattr(cfg, n), getattr(saved, n))}
    lines = [f"{n}: {getattr(saved, n)!r} -> {v!r}" for n, v in changes.items()]
    # how this process continues (--resume or --auto-resume) is this command's, not the saved run's
    values = {**vars_of(saved), **changes, "resume": cfg.resume, "auto_resume": cfg.auto_resume}
    return TrainConfig(**values), lines


def _same(name: str, given: Any, saved: Any) -> bool:
    """A flag given again with the saved value; --records is saved as an absolute path, so a
    relative one naming the same folder is the same."""
    if name == "records" and given and saved:
        return Path(given).absolute() == Path(saved).absolute()
    return given == saved


def vars_of(cfg: TrainConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in TrainConfig.__dataclass_fields__}


__all__ = ["TrainConfig", "DEMO", "PRESETS", "HELP_GROUPS", "parse_train_args", "parse_command", "merge_explicit"]
