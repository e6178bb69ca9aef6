"""Forward+backward images/s: our two-tower AlexNet vs a plain nn.Sequential of the same layers.

    python -m bench.model                                   # CPU, batch 128
    python -m bench.model --device cuda:0 --amp bf16 --channels-last --steps 20 --json out.json
    python -m bench.model --device cuda:0,cuda:1            # ours split over two GPUs
    python -m bench.model --device cuda:0 --amp fp16 --channels-last   # fp16 with a loss scale

The reference is what a user would write: the same layers as one nn.Sequential, grouped
convolutions (groups=2) for conv2/4/5 and torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)
(torch divides alpha by size, so 5e-4 is the paper's 1e-4; it normalises across the tower
boundary, which the paper's net does not, but it costs the same). Both nets run in the same
process, interleaved, on the same input; we report medians and ours / reference.
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.atomic import write_json
from common.charts import bar_chart
from common.cli import run_command
from common.config import check_at_least, parse_args, to_dict
from common.devices import parse_device, sync
from common.system import machine
from common.timing import interleaved
from model import AlexNet, AlexNetConfig


@dataclass(frozen=True)
class BenchConfig:
    device: str = field(default="cpu", metadata={
        "help": "device for both nets, or two comma-separated devices to split ours (cuda:0,cuda:1)"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    steps: int = field(default=1, metadata={"help": "timed forward+backward steps per repeat"})
    repeats: int = field(default=3, metadata={"help": "interleaved timed repeats per net (median taken)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps per net first"})
    amp: str = field(default="none", metadata={"help": "autocast dtype (fp16: with a loss scale)",
                                               "choices": ["none", "bf16", "fp16"]})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format"})
    json: str | None = field(default=None, metadata={"help": "also write the results here"})
    plot: str | None = field(default=None, metadata={"help": "also draw the table as a bar chart (PNG)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check_at_least(self, ("batch_size", "steps", "repeats"))
        check_at_least(self, ("warmup",), minimum=0)
        if not 1 <= len(self.devices) <= 2:
            raise ValueError(f"--device takes one or two devices, got {self.device!r}")

    @property
    def devices(self) -> list[str]:
        return [d.strip() for d in self.device.split(",") if d.strip()]


def reference_net(num_classes: int = 1000) -> nn.Sequential:
    """The same layers, written the plain way (one device, grouped convolutions)."""
    pool = lambda: nn.MaxPool2d(3, 2)  # noqa: E731
    lrn = lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, 4, 2), nn.ReLU(), lrn(), pool(),
        nn.Conv2d(96, 256, 5, 1, 2, groups=2), nn.ReLU(), lrn(), pool(),
        nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, 1, 1, groups=2), nn.ReLU(),
        nn.Conv2d(384, 256, 3, 1, 1, groups=2), nn.ReLU(), pool(),
        nn.Flatten(),
        nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, num_classes))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str):
    """One forward+backward (no optimiser: both nets would pay the same for it). fp16 scales
    the loss as training's GradScaler does (the unscale/inf check belongs to the optimiser
    step, not timed here)."""
    dtype = AMP_DTYPES.get(amp, torch.bfloat16)
    scaler = torch.amp.GradScaler(x.device.type) if amp == "fp16" else None

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=amp in AMP_DTYPES):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for p in net.parameters():
            p.grad = None
    return step


def images(step, steps: int, batch_size: int):
    """``steps`` calls of ``step`` as one timed turn; returns the images they processed."""
    def run() -> int:
        for _ in range(steps):
            step()
        return steps * batch_size
    return run


def build(cfg: BenchConfig):
    devices = [parse_device(d) for d in cfg.devices]
    torch.backends.cudnn.benchmark = True   # fixed input size: let cuDNN pick, for both nets
    torch.manual_seed(0)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    ours = AlexNet(AlexNetConfig()).place(devices).to(memory_format=fmt).train()
    ref = reference_net().to(devices[0], memory_format=fmt).train()
    # 0-255 scale minus mean: std ~60 like real centred pixels
    x = (torch.randn(cfg.batch_size, 3, 224, 224, device=devices[0]) * 60).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (cfg.batch_size,), device=devices[0])
    return devices, {"ours": make_step(ours, x, y, cfg.amp), "reference": make_step(ref, x, y, cfg.amp)}


def run(cfg: BenchConfig) -> dict:
    from rich.progress import Progress
    devices, steps = build(cfg)
    total = len(steps) * (cfg.warmup + cfg.repeats * cfg.steps)
    with Progress(disable=not cfg.progress, transient=True) as bar:
        task = bar.add_task("forward+backward", total=total)
        for name, step in steps.items():       # untimed: cuDNN's algorithm search, allocator
            images(step, cfg.warmup, cfg.batch_size)()
            sync(devices)
            bar.advance(task, cfg.warmup)
        samples = interleaved({name: images(step, cfg.steps, cfg.batch_size) for name, step in steps.items()},
                              cfg.repeats, devices=devices, alternate=True,
                              on_turn=lambda r, name: bar.advance(task, cfg.steps))
    rates = {name: [s.rate for s in runs] for name, runs in samples.items()}
    medians = {name: statistics.median(v) for name, v in rates.items()}
    return {"config": to_dict(cfg), "machine": machine(cfg.devices), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "images_per_s": rates, "median_images_per_s": medians,
            "ratio_ours_over_reference": medians["ours"] / medians["reference"]}


def print_table(result: dict) -> None:
    from rich.table import Table

    from common.console import make_console
    cfg = result["config"]
    table = Table(title=f"AlexNet forward+backward, batch {cfg['batch_size']}, {cfg['device']}, "
                        f"amp {cfg['amp']}, channels_last {cfg['channels_last']}")
    for col in ("net", "median img/s", "min", "max", "vs reference"):
        table.add_column(col, justify="right" if col != "net" else "left")
    ref = result["median_images_per_s"]["reference"]
    for name, values in result["images_per_s"].items():
        med = result["median_images_per_s"][name]
        table.add_row(name, f"{med:.2f}", f"{min(values):.2f}", f"{max(values):.2f}", f"{med / ref:.3f}x")
    make_console().print(table)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(BenchConfig, argv, prog="python -m bench.model", description=__doc__.split("\n")[0])

    def work() -> None:
        result = run(cfg)             # a UserError: e.g. a device that does not exist
        print_table(result)
        if cfg.json:
            write_json(cfg.json, result)
        if cfg.plot:
            bar_chart(cfg.plot, {n: (result["median_images_per_s"][n], min(v), max(v))
                                 for n, v in result["images_per_s"].items()},
                      title=f"AlexNet forward+backward, batch {cfg.batch_size}, {cfg.device}", xlabel="images/s")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
