"""Loader bench: our DALI train view against FFCV, a PyTorch DataLoader and the decode floors.

    python -m bench.loaders --records data/records                       # all loaders, CPU
    python -m bench.loaders --records data/records --loaders dali,torch,decode \\
        --batches 30 --warmup 5 --repeats 5 --threads 2 --json bench.json
    python -m bench.loaders --records data/records --device cuda:0       # GPU variants

Every loader makes the paper's training view from the same records — random 224×224
window, mirror, PCA lighting, per-channel mean subtracted; float32 (B, 3, 224, 224)
contiguous NCHW on the 0–255 scale — with the same batch size, the same number of worker
threads/processes (default: all cores) and the same device (bench/baselines.py says how
and where a library falls short). The floors decode the same JPEGs and do nothing else:
"decode" with DALI's decoder (the ratio our targets use), "decode-ffcv" with FFCV's on the
beton's copy of the images. FFCV loaders need OUT/train.beton (prep/build_records.py --ffcv).

Method: every loader is built and started first (setup, JIT compilation and worker start-up
are not timed); then K repeats, interleaved (dali, ffcv, torch, decode, ..., dali, ...). Before
each loader's turn the bench waits until the process tree is idle — the loaders not being timed
have refilled their prefetch queues — so one loader's background work is never billed to the
next; then W warm-up batches (they also drain what this loader prefetched while it waited) and
N timed batches. A loader's number is the median over repeats of N·B / seconds; min–max
shows the spread; per core = images/s ÷ min(threads, cores).

"dali-u8" times what the loader hands over (uint8 pixels plus the per-sample mean); the
device-side ``pipeline.finish`` that makes them the float view is timed apart, on the same
device, over the last batch ("finish img/s" in the JSON and below the table).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.atomic import write_json
from common.charts import bar_chart
from common.cli import run_command
from common.config import check_at_least, parse_args
from common.console import make_console
from common.errors import UserError
from common.system import machine, usable_cores
from common.timing import interleaved, timed
from pipeline.finish import U8Batch, finish
from records.folder import read_stats, shard_paths
from records.format import DEFAULT_RECORDS

ALL_LOADERS = ("dali", "dali-u8", "ffcv", "torch", "decode", "decode-ffcv")
OPT_IN = ("dali-numba",)   # by name only, never in 'auto' (a numba compile at start-up)
NEEDS_BETON = ("ffcv", "decode-ffcv")
FLOORS = ("decode", "decode-ffcv")
WHAT = {   # one line per loader for the table: what it computes
    "dali": "ours: pipeline.Loader(view='train'), the DALI graph of pipeline/graphs.py",
    "dali-u8": "ours, dtype=uint8: window in DALI, uint8 HWC out (finish mirrors; not timed here)",
    "dali-numba": "ours, LoaderOptions(kernel='numba'): mirror+mean+cast by pipeline/kernels.py",
    "ffcv": "FFCV: decode+crop (RRC pinned to 224², no resampling), flip, our numba lighting+mean",
    "torch": "DataLoader, T processes: PIL decode, numpy crop/mirror/lighting/mean, collate",
    "decode": "floor: DALI reads + decodes the same JPEGs (uint8 HWC), nothing else",
    "decode-ffcv": "floor: FFCV decodes the beton's JPEGs (uint8 HWC), nothing else",
}


class BenchError(UserError, ValueError):
    """A bench argument cannot be honoured; one line for the user."""


@dataclass(frozen=True)
class BenchConfig:
    records: str = field(default=str(DEFAULT_RECORDS), metadata={"help": "records folder (prep/build_records.py)"})
    loaders: str = field(default="auto", metadata={
        "help": f"comma list of {','.join(ALL_LOADERS + OPT_IN)}, run in this order; 'auto': "
                f"all but {','.join(OPT_IN)}, without the FFCV ones when RECORDS/train.beton is missing"})
    device: str = field(default="cpu", metadata={"help": "where batches end up: cpu or cuda:N"})
    batch_size: int = field(default=128, metadata={"help": "images per batch, every loader"})
    batches: int = field(default=20, metadata={"help": "timed batches per repeat"})
    warmup: int = field(default=5, metadata={"help": "untimed batches before each repeat (>= prefetch depth)"})
    repeats: int = field(default=3, metadata={"help": "interleaved repeats per loader; the median is reported"})
    threads: int | None = field(default=None, metadata={
        "help": "DALI threads = FFCV workers = DataLoader processes; default: all cores"})
    seed: int = field(default=0, metadata={"help": "seed of every loader's shuffle and draws"})
    json: str | None = field(default=None, metadata={"help": "also write the results to this JSON file"})
    plot: str | None = field(default=None, metadata={"help": "also draw the table as a bar chart (PNG)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        check_at_least(self, ("batch_size", "batches", "repeats", "threads"))
        check_at_least(self, ("warmup",), minimum=0)
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be cpu or cuda:N, got {self.device!r}")
        if self.loaders != "auto":
            names = self.loader_names()
            bad = [n for n in names if n not in ALL_LOADERS + OPT_IN]
            if bad or not names or len(set(names)) != len(names):
                raise ValueError(f"--loaders must be distinct names from {','.join(ALL_LOADERS + OPT_IN)}, "
                                 f"got {self.loaders!r}")

    def loader_names(self) -> list[str]:
        return [n.strip() for n in self.loaders.split(",") if n.strip()]


# ----------------------------------------------------------------------------- loaders

def choose_loaders(cfg: BenchConfig, beton: Path, console: Console) -> list[str]:
    """The loaders to run; FFCV ones need the beton (an error if asked for by name)."""
    if cfg.loaders != "auto":
        names = cfg.loader_names()
        if any(n in NEEDS_BETON for n in names) and not beton.is_file():
            raise BenchError(f"{beton}: missing; build records with --ffcv or leave ffcv out of --loaders")
        return names
    if beton.is_file():
        return list(ALL_LOADERS)
    console.print(f"[yellow]note:[/] {beton} missing (prep/build_records.py --ffcv): FFCV loaders not run")
    return [n for n in ALL_LOADERS if n not in NEEDS_BETON]


def make_loader(name: str, cfg: BenchConfig, records: Path, threads: int):
    """One loader of ``name``; every one gets the same batch size, threads and device."""
    from bench import baselines as B
    shards, beton = shard_paths(records, "train"), records / "train.beton"
    if name in ("dali", "dali-u8", "dali-numba"):
        from pipeline import Loader, LoaderOptions
        return Loader(records, split="train", view="train", batch_size=cfg.batch_size,
                      device=cfg.device, seed=cfg.seed, num_threads=threads,
                      dtype=torch.uint8 if name == "dali-u8" else torch.float32,
                      options=LoaderOptions(kernel="numba" if name == "dali-numba" else "dali"))
    if name == "torch":
        return B.torch_loader(shards, read_stats(records), cfg.batch_size, threads, cfg.device, cfg.seed)
    if name == "decode":
        return B.DaliDecodeLoader(shards, cfg.batch_size, threads, cfg.device, cfg.seed)
    if name == "ffcv":
        return B.ffcv_loader(beton, read_stats(records), cfg.batch_size, threads, cfg.device, cfg.seed)
    if name == "decode-ffcv":
        return B.ffcv_decode_loader(beton, cfg.batch_size, threads, cfg.device, cfg.seed)
    raise BenchError(f"unknown loader {name!r}")


class Stream:
    """A loader as an endless stream of batches on ``device``: epochs follow one another."""

    def __init__(self, name: str, loader, device: torch.device):
        self.name, self.loader, self.device = name, loader, device
        self._it = None
        self.last = None      # the last (images, labels), for shape/dtype checks
        self.u8 = None        # the last U8Batch (dali-u8), for timing finish

    def next(self):
        from bench.baselines import tensor_pair
        batch = next(self._it, None) if self._it is not None else None
        if batch is None:              # first call or epoch boundary: start the next epoch
            self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is None:
                raise BenchError(f"{self.name}: an epoch holds no full batch; use a smaller --batch-size")
        images, labels = tensor_pair(batch)
        if isinstance(images, U8Batch):    # dali-u8: the host-side part; finish is timed apart
            self.u8 = images
            images = images.pixels
        if images.device != self.device:   # the DataLoader's pinned CPU batches on a GPU run
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True) if labels is not None else None
        self.last = (images, labels)
        return self.last


def build_streams(cfg: BenchConfig, records: Path, names: list[str], threads: int) -> dict[str, Stream]:
    """Build every loader and pull its first batch (start-up and JIT are not timed).

    The DataLoader goes first so its worker processes fork before DALI's and numba's
    thread pools exist in this process."""
    device = torch.device(cfg.device)
    streams = {}
    for name in sorted(names, key=lambda n: n != "torch"):
        streams[name] = Stream(name, make_loader(name, cfg, records, threads), device)
        streams[name].next()
    return {n: streams[n] for n in names}


# ----------------------------------------------------------------------------- measuring

def _cpu_ticks() -> int:
    """CPU time (clock ticks) used so far by this process (all threads) and its children
    (the DataLoader's workers), from /proc; 0 where there is no /proc."""
    me, total = os.getpid(), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue                                  # a process that just ended
        if stat.parent.name == str(me) or fields[1] == str(me):   # fields[1]: parent pid
            total += int(fields[11]) + int(fields[12])            # utime + stime
    return total


def settle(quiet: float = 0.1, window: float = 0.2, limit: float = 20.0) -> None:
    """Wait until the loaders not being timed have finished refilling their prefetch queues
    (this process tree uses < ``quiet`` of a core over ``window`` s), so a slow loader's
    background work never lands in the next loader's timed window. Gives up after ``limit`` s."""
    if not Path("/proc/self/stat").exists():
        return
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + limit
    before = _cpu_ticks()
    while time.monotonic() < deadline:
        time.sleep(window)
        now = _cpu_ticks()
        if (now - before) / hz < quiet * window:
            return
        before = now


def measure(streams: dict[str, Stream], cfg: BenchConfig, progress: bool = True) -> dict[str, list[float]]:
    """Images/s of each loader per repeat (common.timing: interleaved rounds, one clock). Before
    each loader's turn: wait until the others are quiet, then ``cfg.warmup`` untimed batches;
    the turn is ``cfg.batches`` batches."""
    def batches(stream: Stream):
        return lambda: sum(stream.next()[0].shape[0] for _ in range(cfg.batches))

    def prepare(name: str) -> None:
        settle()
        for _ in range(cfg.warmup):
            streams[name].next()

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("loader bench", total=cfg.repeats * len(streams))
        turns = iter(range(cfg.repeats * len(streams)))

        def on_turn(r: int, name: str) -> None:
            bar.update(task, completed=next(turns), description=f"repeat {r + 1}/{cfg.repeats}: {name}")

        samples = interleaved({n: batches(s) for n, s in streams.items()}, cfg.repeats,
                              devices=[torch.device(cfg.device)], prepare=prepare, on_turn=on_turn)
    return {name: [s.rate for s in runs] for name, runs in samples.items()}


def time_finish(stream: Stream, repeats: int = 5) -> float:
    """Images per second of ``pipeline.finish`` (float32, channels_last) on the stream's device,
    over its last uint8 batch: the median of ``repeats`` calls after one untimed call."""
    def once() -> int:
        return finish(stream.u8, stream.device).shape[0]
    once()
    return statistics.median(timed(once, [stream.device]).rate for _ in range(repeats))


def summarise(runs: dict[str, list[float]], streams: dict[str, Stream], cfg: BenchConfig,
              threads: int) -> dict[str, dict]:
    """Per loader: median/min/max images/s, per-core rate, ratios to the floors and torch."""
    used = min(threads, usable_cores())
    out = {}
    for name, rates in runs.items():
        images, labels = streams[name].last
        out[name] = {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                     "per_core": statistics.median(rates) / used, "runs": rates, "what": WHAT[name],
                     "output": {"shape": list(images.shape), "dtype": str(images.dtype),
                                "device": str(images.device)},
                     "epoch_batches": len(streams[name].loader), "threads": threads,
                     "batch_size": cfg.batch_size, "batches": cfg.batches, "warmup": cfg.warmup,
                     "repeats": cfg.repeats, "device": cfg.device}
    for name, entry in out.items():
        if streams[name].u8 is not None:
            entry["finish_images_per_s"] = time_finish(streams[name])
            entry["finish_threads"] = torch.get_num_threads()
        for ref_name, key in (("decode", "vs_decode"), ("decode-ffcv", "vs_decode_ffcv"), ("torch", "vs_torch")):
            if ref_name in out:
                entry[key] = entry["images_per_s"] / out[ref_name]["images_per_s"]
    return out


def machine_info(device: str) -> dict:
    """CPU model, cores, GPU, library versions and the date (UTC) of this run."""
    return {**machine([device]), "device": device}


# ----------------------------------------------------------------------------- report

def _ratio(entry: dict, key: str) -> str:
    return f"{entry[key]:.2f}×" if key in entry else "–"


def render(result: dict, console: Console) -> None:
    """The rich summary table, then the CPU targets for the DALI train views."""
    m = result["machine"]
    any_entry = next(iter(result["loaders"].values()))
    table = Table(title=f"Loader bench: {m['cpu']}, {m['cores']} cores, device {m['device']}, "
                        f"batch {any_entry['batch_size']}, threads {any_entry['threads']}, "
                        f"{any_entry['repeats']}×{any_entry['batches']} batches")
    # a ratio column only where its reference loader ran (no column of dashes)
    ratios = [(col, key) for col, key in (("×decode", "vs_decode"), ("×decode-ffcv", "vs_decode_ffcv"),
                                          ("×torch", "vs_torch"))
              if any(key in e for e in result["loaders"].values())]
    for col, just in (("loader", "left"), ("img/s median", "right"), ("min–max", "right"),
                      ("per core", "right"), *((col, "right") for col, _ in ratios)):
        # min_width: a narrow terminal wraps the cells, never cuts a header ("×decode-ff…")
        table.add_column(col, justify=just, no_wrap=col == "loader", min_width=len(col))
    for name, e in result["loaders"].items():
        table.add_row(name, f"{e['images_per_s']:.0f}", f"{e['min']:.0f}–{e['max']:.0f}",
                      f"{e['per_core']:.0f}", *(_ratio(e, key) for _, key in ratios))
    console.print(table)
    for name, e in result["loaders"].items():
        console.print(f"  {name}: {e['what']}")
        if "finish_images_per_s" in e:
            console.print(f"  {name}: pipeline.finish on {e['device']}: "
                          f"{e['finish_images_per_s']:.0f} img/s ({e['finish_threads']} torch threads)")
    if any_entry["warmup"] < 2 * any_entry["threads"]:
        console.print(f"[yellow]note:[/] --warmup {any_entry['warmup']} is below the DataLoader's "
                      f"prefetch ({2 * any_entry['threads']} batches): batches prefetched while a "
                      "loader waited can inflate its number")
    shortest = min(e["epoch_batches"] for e in result["loaders"].values())
    if shortest < any_entry["batches"] + any_entry["warmup"]:
        console.print(f"[yellow]note:[/] an epoch is only {shortest} batches: loaders that restart "
                      "per epoch (FFCV, DataLoader) pay that restart often here; use more records")
    for line in target_lines(result["loaders"]):
        console.print(line)


def target_lines(loaders: dict) -> list[str]:
    """The CPU targets for the DALI train views, where the loaders to compare ran."""
    checks = [("dali", "decode", 0.75, "the DALI decode-only floor"),
              ("dali", "ffcv", 1.0, "FFCV's closest pipeline"),
              ("dali", "torch", 1.5, "the DataLoader"),
              ("dali-u8", "decode", 0.9, "the DALI decode-only floor")]
    lines = []
    for ours, name, factor, label in checks:
        if ours in loaders and name in loaders:
            ratio = loaders[ours]["images_per_s"] / loaders[name]["images_per_s"]
            verdict = "[green]met[/]" if ratio >= factor else "[red]missed[/]"
            lines.append(f"target {ours} ≥ {factor:g}× {label}: {ratio:.2f}× — {verdict}")
    return lines


# ----------------------------------------------------------------------------- entry point

def bench(cfg: BenchConfig, console: Console) -> tuple[dict, dict[str, Stream]]:
    """Build, measure and print; returns the JSON-shaped result and the (still open) streams."""
    records = Path(cfg.records)
    shard_paths(records, "train")                # fail early, naming the missing file
    read_stats(records)
    names = choose_loaders(cfg, records / "train.beton", console)
    threads = cfg.threads or usable_cores()
    streams = build_streams(cfg, records, names, threads)
    runs = measure(streams, cfg, progress=cfg.progress)
    result = {"machine": machine_info(cfg.device), "loaders": summarise(runs, streams, cfg, threads)}
    render(result, console)
    return result, streams


def run(cfg: BenchConfig, console: Console | None = None) -> dict:
    """The bench as the CLI runs it: print the table and (with --json) write the file atomically."""
    console = console or make_console()
    result, _ = bench(cfg, console)
    if cfg.json:
        write_json(cfg.json, result)
        console.print(f"wrote {cfg.json}")
    if cfg.plot:
        bar_chart(cfg.plot, {n: (e["images_per_s"], e["min"], e["max"]) for n, e in result["loaders"].items()},
                  title=f"Loader bench, train view, batch {cfg.batch_size}, {cfg.device}", xlabel="images/s")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(BenchConfig, argv, prog="python -m bench.loaders",
                     description=__doc__.split("\n\n")[0])

    def work() -> None:
        run(cfg)
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
