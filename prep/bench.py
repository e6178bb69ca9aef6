"""Prep throughput: our records writer vs FFCV's DatasetWriter vs a bare PIL loop (the floor).

    python -m prep.bench                              # on the built-in sample set (data/sample)
    python -m prep.bench --source /data/imagenet-subset --workers 8 --repeat 3 --json prep_bench.json

All three process the same source files (train + val of --source), side by side in one run,
with the same number of worker processes, after one warm-up read so every file is in the page
cache. Reported as images/s and as ratios, plus CPU ms per image (this process and its worker
processes, from os.times()), which is far less sensitive than wall time to other work sharing
the cores.

- ours:  ``build_records.build`` end to end (decode with JPEG draft, resize, exact pixel sums,
         JPEG q90 encode, tar + DALI index, stats.json, meta.json) into a temp folder.
- FFCV:  ``ffcv.writer.DatasetWriter`` the way ffcv-imagenet's write_imagenet.py uses it: a
         dataset returning the PIL-decoded RGB image, ``RGBImageField(write_mode="jpg",
         max_resolution=256, jpeg_quality=90)`` (FFCV resizes with OpenCV INTER_AREA so the
         longer side is <= 256; it does not crop) plus an ``IntField`` label.
- floor: a bare loop per process: read, PIL decode (no draft), resize shorter side to 256,
         centre crop, JPEG q90 encode; nothing written. The same work minus everything a usable
         dataset needs; "1 process" is the same loop without a pool.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from prep.build_records import PrepConfig, build, ensure_sample
from prep.records import DEFAULT_SAMPLE
from prep.source import scan

QUALITY = 90


def floor_one(path: str) -> int:
    """Decode + resize (shorter side 256) + centre crop + encode; returns the JPEG size."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except OSError:
        return 0
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.Resampling.BILINEAR)
    left, top = (img.width - 256) // 2, (img.height - 256) // 2
    buf = io.BytesIO()
    img.crop((left, top, left + 256, top + 256)).save(buf, "JPEG", quality=QUALITY)
    return buf.tell()


def run_floor(paths: list[str], workers: int) -> None:
    if workers == 1:
        for p in paths:
            floor_one(p)
    else:
        with multiprocessing.Pool(workers) as pool:
            pool.map(floor_one, paths, chunksize=16)


def run_ours(source: Path, out: Path, workers: int) -> None:
    build(PrepConfig(source=str(source), out=str(out), workers=workers, quality=QUALITY, progress=False))


class DecodedImages:
    """ffcv-imagenet's input: (full-size RGB uint8 array, label); undecodable -> a black 1x1."""

    def __init__(self, items: list[tuple[str, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB")), label
        except OSError:
            return np.zeros((1, 1, 3), np.uint8), label


def run_ffcv(items: list[tuple[str, int]], out: Path, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=256, jpeg_quality=QUALITY),
              "label": IntField()}
    DatasetWriter(str(out), fields, num_workers=workers).from_indexed_dataset(DecodedImages(items))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its reaped children) of fn(*args)."""
    c0, t0 = _cpu(), time.perf_counter()
    fn(*args)
    wall = time.perf_counter() - t0
    for child in multiprocessing.active_children():  # reap this method's workers now, so their
        child.join(timeout=10)                       # CPU time is not billed to the next method
    return wall, _cpu() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prep.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=None, help="ImageNet-style folder; default: the built-in sample set")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-ffcv", action="store_true", help="skip the FFCV writer")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each method's fastest round is reported")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    source = Path(args.source) if args.source else DEFAULT_SAMPLE
    if args.source is None:
        ensure_sample(source, progress=True)
    src = scan(source)
    items = [(str(source / it.rel), it.label) for it in src.train + src.val]
    paths = [p for p, _ in items]
    for p in paths:  # warm the page cache: every method reads from memory
        Path(p).read_bytes()
    if not args.no_ffcv:
        import ffcv.writer  # noqa: F401  (import cost, ~20 s of numba, is not FFCV's throughput)
    methods = {"floor (bare PIL loop, 1 process)": lambda tmp: run_floor(paths, 1),
               f"floor (bare PIL loop, {args.workers} processes)": lambda tmp: run_floor(paths, args.workers),
               "ours (build_records)": lambda tmp: run_ours(source, tmp / "records", args.workers)}
    if not args.no_ffcv:
        methods["FFCV DatasetWriter"] = lambda tmp: run_ffcv(items, tmp / "bench.beton", args.workers)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeat):  # rounds interleave the methods, so load drift hits all alike
        for name, fn in methods.items():
            with tempfile.TemporaryDirectory() as tmp:
                wall, cpu = timed(fn, Path(tmp))
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    report(len(paths), best, args)
    return 0


def report(n: int, seconds: dict, args) -> None:
    """seconds: {method: (wall s, cpu s)}; ratios are throughput ratios (higher = faster)."""
    from rich.console import Console
    from rich.table import Table
    rates = {k: n / wall for k, (wall, _) in seconds.items()}
    cpu_ms = {k: 1000 * cpu / n for k, (_, cpu) in seconds.items()}
    base = f"floor (bare PIL loop, {args.workers} processes)"
    ffcv = "FFCV DatasetWriter" if "FFCV DatasetWriter" in seconds else None
    t = Table(title=f"prep throughput: {n} images, {args.workers} workers, best of {args.repeat}")
    for col in ("method", "wall s", "img/s", "vs floor", "vs FFCV", "CPU ms/img", "CPU vs floor"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for k, (wall, _) in seconds.items():
        t.add_row(k, f"{wall:.2f}", f"{rates[k]:.0f}", f"{rates[k] / rates[base]:.2f}",
                  f"{rates[k] / rates[ffcv]:.2f}" if ffcv else "-",
                  f"{cpu_ms[k]:.2f}", f"{cpu_ms[base] / cpu_ms[k]:.2f}")
    Console(width=140).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "workers": args.workers, "images_per_s": rates,
                                               "cpu_ms_per_image": cpu_ms}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
