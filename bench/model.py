"""Training-step images/s (forward + backward + the SGD update): our two-tower AlexNet vs a plain
nn.Sequential of the same layers.

    python -m bench.model                                   # CPU, batch 128
    python -m bench.model --device cuda:0 --amp bf16 --channels-last --steps 20 --json out.json
    python -m bench.model --device cuda:0,cuda:1            # ours split over two GPUs
    python -m bench.model --device cuda:0 --amp fp16 --channels-last   # fp16 with a loss scale
    python -m bench.model --no-optimizer                    # forward + backward only (the old figure)

The reference is what a user would write: the same layers as one nn.Sequential, grouped
convolutions (groups=2) for conv2/4/5 and torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)
(torch divides alpha by size, so 5e-4 is the paper's 1e-4; it normalises across the tower
boundary, which the paper's net does not, but it costs the same). Both nets run in the same
process, interleaved, on the same input; we report medians and ours / reference.

Each timed step is what a training step does to the model: the forward under autocast, the
loss, the (fp16: scaled) backward and the optimiser step, with the recipe's SGD
(``engine.recipe.make_optimizer`` with the default config: momentum 0.9, weight decay 5e-4, the
fused kernel where torch has it) and ``engine.precision.Precision`` (fp16: GradScaler's unscale,
inf check and update), so the figure is the model's rate inside the training loop minus the
data. The JSON's ``optimizer`` says which figure it is (``--no-optimizer``: forward + backward).
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common.atomic import write_json
from common.charts import bar_chart
from common.cli import run_command
from common.config import check_at_least, parse_args, to_dict
from common.devices import parse_device, sync
from common.system import machine
from common.timing import interleaved
from engine.config import TrainConfig
from engine.precision import Precision
from engine.recipe import loss_fn, make_optimizer
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
    optimizer: bool = field(default=True, metadata={
        "help": "time the SGD update too (the recipe's optimiser); --no-optimizer: forward + backward only"})
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


def make_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str, optimizer: bool = True):
    """One training step of ``net`` on (x, y): forward, loss, backward, and (``optimizer``) the
    recipe's SGD update through ``Precision.step`` (fp16: unscale, skip on inf, update the
    scale), as engine.loop.train_step does it. Without ``optimizer``: forward + backward only,
    fp16 scaling the loss as training's GradScaler does."""
    precision = Precision(amp, x.device.type)
    sgd = make_optimizer(net, TrainConfig()) if optimizer else None

    def step() -> None:
        with precision.autocast():
            logits = net(x)
        loss = loss_fn(logits, y)
        precision.backward(loss)
        if sgd is not None:
            precision.step(sgd)
        for p in net.parameters():
            p.grad = None
    return step


def what(optimizer: bool) -> str:
    return "forward+backward+SGD" if optimizer else "forward+backward"


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
    return devices, {"ours": make_step(ours, x, y, cfg.amp, cfg.optimizer),
                     "reference": make_step(ref, x, y, cfg.amp, cfg.optimizer)}


def run(cfg: BenchConfig) -> dict:
    from rich.progress import Progress
    devices, steps = build(cfg)
    total = len(steps) * (cfg.warmup + cfg.repeats * cfg.steps)
    with Progress(disable=not cfg.progress, transient=True) as bar:
        task = bar.add_task(what(cfg.optimizer), total=total)
        for name, step in steps.items():       # untimed: cuDNN's algorithm search, allocator
            images(step, cfg.warmup, cfg.batch_size)()
            sync(devices)
            bar.advance(task, cfg.warmup)
        samples = interleaved({name: images(step, cfg.steps, cfg.batch_size) for name, step in steps.items()},
                              cfg.repeats, devices=devices, alternate=True,
                              on_turn=lambda r, name: bar.advance(task, cfg.steps))
    rates = {name: [s.rate for s in runs] for name, runs in samples.items()}
    medians = {name: statistics.median(v) for name, v in rates.items()}
    return {"config": to_dict(cfg), "optimizer": cfg.optimizer, "machine": machine(cfg.devices), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "images_per_s": rates, "median_images_per_s": medians,
            "ratio_ours_over_reference": medians["ours"] / medians["reference"]}


def print_table(result: dict) -> None:
    from rich.table import Table

    from common.console import make_console
    cfg = result["config"]
    table = Table(title=f"AlexNet {what(result['optimizer'])}, batch {cfg['batch_size']}, {cfg['device']}, "
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
                      title=f"AlexNet {what(cfg.optimizer)}, batch {cfg.batch_size}, {cfg.device}", xlabel="images/s")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
