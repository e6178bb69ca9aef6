"""Per-image CPU cost of each Loader view against plain DALI decoding, on the CPU.

    python -m bench.cost --records data/records --batch-size 64 --threads 2 --repeats 7

CPU-seconds per image (all threads of this process: common.timing's CPU clock) are measured
next to wall-clock images/s ("train-u8": the uint8 train view, without the device-side
finish), because on a shared machine the wall clock mostly measures the neighbours, while
the CPU time a view burns per image does not depend on them. The floor is
bench's "decode" loader (the same reader, JPEG decode to uint8 HWC, nothing else);
"decode-window" decodes only the train view's 224×224 windows (the least a train view does),
"feed" only hands DALI the JPEG bytes (our reader, no decode): the rows between them split a
train view's cost into feed, decode, and what the ops after the decoder add. Loaders
are built and warmed up first, then measured in interleaved repeats; numbers are medians.
"train-numba" (by name: ``--views train,train-numba``) is the float train view with
``LoaderOptions(kernel="numba")`` (pipeline/kernels.py).
The side-by-side loader bench (FFCV, DataLoader) is bench/loaders.py.
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

from rich.table import Table

from common.atomic import write_json
from common.cli import run_command
from common.config import check_at_least, parse_args
from common.console import make_console
from common.timing import interleaved
from records.folder import shard_paths
from records.format import DEFAULT_RECORDS

VIEWS = {"decode": None, "decode-window": None, "feed": None,
         "train": ("train", "train"), "train-u8": ("train", "train"),
         "center": ("val", "center"), "tencrop": ("val", "tencrop")}
OPT_IN = {"train-numba": ("train", "train")}   # by name only (a numba compile at start-up)


@dataclass(frozen=True)
class CostConfig:
    records: str = field(default=str(DEFAULT_RECORDS), metadata={"help": "records folder"})
    batch_size: int = field(default=64, metadata={"help": "images per batch"})
    threads: int = field(default=2, metadata={"help": "DALI threads per pipeline"})
    batches: int = field(default=8, metadata={"help": "measured batches per repeat"})
    repeats: int = field(default=7, metadata={"help": "interleaved repeats; medians reported"})
    views: str = field(default="auto", metadata={
        "help": f"comma list of {','.join([*VIEWS, *OPT_IN])} (decode and decode-window always "
                f"run); 'auto': all but {','.join(OPT_IN)}"})
    json: str | None = field(default=None, metadata={"help": "also write the results here"})

    def __post_init__(self):
        check_at_least(self, ("batch_size", "threads", "batches", "repeats"))
        names = self.view_names()
        if any(n not in {**VIEWS, **OPT_IN} for n in names) or len(set(names)) != len(names):
            raise ValueError(f"--views must be distinct names from {','.join([*VIEWS, *OPT_IN])}, "
                             f"got {self.views!r}")

    def view_names(self) -> list[str]:
        """The views measured: the two floors the table divides by, then those asked for."""
        asked = list(VIEWS) if self.views == "auto" else [n.strip() for n in self.views.split(",") if n.strip()]
        return ["decode", "decode-window"] + [n for n in asked if n not in ("decode", "decode-window")]


def endless(loader):
    """Batches forever, epoch after epoch; yields the number of images in each."""
    while True:
        for batch in loader:
            yield len(batch[0])       # a tensor, or a U8Batch (train-u8)


def make(name: str, cfg: CostConfig):
    from pipeline import Loader
    from bench.baselines import DaliDecodeLoader
    if VIEWS.get(name, ()) is None:
        mode = {"decode": "full", "decode-window": "window", "feed": "none"}[name]
        return DaliDecodeLoader(shard_paths(cfg.records, "train"), cfg.batch_size, cfg.threads,
                                decode=mode)
    split, view = {**VIEWS, **OPT_IN}[name]
    import torch
    from pipeline import LoaderOptions
    return Loader(cfg.records, split=split, view=view, batch_size=cfg.batch_size,
                  num_threads=cfg.threads, dtype=torch.uint8 if name.endswith("-u8") else torch.float32,
                  options=LoaderOptions(kernel="numba" if name.endswith("-numba") else "dali"))


def measure(streams: dict, cfg: CostConfig) -> dict[str, dict[str, float]]:
    """Interleaved repeats (common.timing); per view the medians of ms CPU per image and images/s."""
    from bench.loaders import settle

    def prepare(name: str) -> None:
        settle()      # the view timed before refills its prefetch queue: not on this one's clock
        for _ in range(2):                       # batches prefetched while it waited
            next(streams[name])

    def batches(stream):
        return lambda: sum(next(stream) for _ in range(cfg.batches))

    samples = interleaved({n: batches(s) for n, s in streams.items()}, cfg.repeats, prepare=prepare)
    return {n: {"cpu_ms_per_image": statistics.median(s.cpu_ms_per_item for s in runs),
                "images_per_s": statistics.median(s.rate for s in runs)} for n, runs in samples.items()}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(CostConfig, sys.argv[1:] if argv is None else argv, prog="bench.cost",
                     description=__doc__.splitlines()[0])
    console = make_console()
    return run_command(lambda: measure_and_print(cfg, console))


def measure_and_print(cfg: CostConfig, console) -> None:
    streams = {name: endless(make(name, cfg)) for name in cfg.view_names()}
    for stream in streams.values():
        next(stream)                             # start-up is not measured
    result = measure(streams, cfg)
    floor = result["decode"]["cpu_ms_per_image"]
    table = Table(title=f"CPU cost per image, batch {cfg.batch_size}, {cfg.threads} DALI threads, "
                        f"median of {cfg.repeats}")
    window = result["decode-window"]["cpu_ms_per_image"]
    for col in ("view", "CPU ms / image", "decode cost ÷ this", "ms over decode-window", "images/s (wall)"):
        table.add_column(col, justify="right")
    for name, r in result.items():
        table.add_row(name, f"{r['cpu_ms_per_image']:.3f}", f"{floor / r['cpu_ms_per_image']:.2f}×",
                      f"{r['cpu_ms_per_image'] - window:+.3f}", f"{r['images_per_s']:.0f}")
    console.print(table)
    if cfg.json:
        write_json(cfg.json, {"config": vars(cfg), "results": result})


if __name__ == "__main__":
    sys.exit(main())
