"""Prep throughput: our records writer vs FFCV's DatasetWriter vs the bare decode+resize+encode loop (the floor).

    python -m bench.prep                              # on the built-in sample set (data/sample)
    python -m bench.prep --source /data/imagenet-subset --workers 8 --repeat 3 --json prep_bench.json
    python -m bench.prep --photos 2000 --repeat 3    # on N crops of real photographs (scikit-image),
                                                      # ImageNet's sizes (--photo-sizes mixed: smaller)

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
- floor: a bare loop per process: read, decode, resize with the records' own filter (the
         same ``transform.decode_record``: JPEG draft, OpenCV area/bicubic), JPEG q90
         encode; nothing written. The same work minus everything a usable dataset needs
         (sums, tar, index, partials); "1 process" is the same loop without a pool.

A flat val/ without --val-labels is left out (train only) instead of stopping the bench.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import fail
from common.config import Parser
from common.errors import UserError, error_line
from common.system import usable_cores
from common.timing import interleaved
from prep import transform
from prep.build_records import PrepConfig, build, ensure_sample
from records.format import DEFAULT_SAMPLE
from prep.source import SourceError, scan

QUALITY = 90


def floor_one(path: str) -> int:
    """Decode + the records' resize + encode; returns the JPEG size (0 if undecodable)."""
    try:
        pixels = transform.decode_record(Path(path).read_bytes())
    except (transform.ImageError, OSError):
        return 0
    return len(transform.encode_jpeg(pixels, QUALITY))


def run_floor(paths: list[str], workers: int) -> None:
    if workers == 1:
        for p in paths:
            floor_one(p)
    else:
        with multiprocessing.Pool(workers) as pool:
            pool.map(floor_one, paths, chunksize=16)


def run_ours(source: Path, out: Path, workers: int, val_labels: str | None) -> None:
    build(PrepConfig(source=str(source), out=str(out), workers=workers, quality=QUALITY, progress=False,
                     val_labels=val_labels))


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
    # FFCV's writer draws its own tqdm bar on stderr, over the bench's; its errors are exceptions
    with contextlib.redirect_stderr(io.StringIO()):
        DatasetWriter(str(out), fields, num_workers=workers).from_indexed_dataset(DecodedImages(items))


def _source(args, tmp: Path) -> tuple[Path, str | None]:
    """(source folder, val labels) to bench: --photos N crops, --source, or the sample set. A flat
    val/ without labels is dropped (a train-only view of the source under ``tmp``)."""
    if args.photos:
        from bench.photos import make_photo_set
        return make_photo_set(tmp / "photos", n=args.photos, seed=0, sizes=args.photo_sizes), None
    source = Path(args.source) if args.source else DEFAULT_SAMPLE
    if args.source is None:
        ensure_sample(source, progress=True)
    try:
        scan(source, args.val_labels)
        return source, args.val_labels
    except SourceError as exc:
        if "flat layout" not in str(exc):
            raise
    print(f"note: {source / 'val'} is flat and no --val-labels given: benching train/ only", file=sys.stderr)
    view = tmp / "train-only"
    view.mkdir()
    (view / "train").symlink_to((source / "train").resolve())
    return view, None


def main(argv=None) -> int:
    ap = Parser(prog="python -m bench.prep", description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=None, help="ImageNet-style folder; default: the built-in sample set")
    ap.add_argument("--val-labels", default=None, help="labels of a flat SOURCE/val (as build_records.py)")
    ap.add_argument("--photos", type=int, default=0,
                    help="bench on N crops of real photographs (scikit-image's) instead of --source")
    ap.add_argument("--photo-sizes", choices=("mixed", "imagenet"), default="imagenet",
                    help="--photos sizes: imagenet (ImageNet's size mix, mostly 500x375) or mixed "
                         "(many small photos, as the tests use)")
    ap.add_argument("--workers", type=int, default=usable_cores())
    ap.add_argument("--no-ffcv", action="store_true", help="skip the FFCV writer")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each method's fastest round is reported")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as data_tmp:
        try:
            source, val_labels = _source(args, Path(data_tmp))
            src = scan(source, val_labels)
        except (UserError, OSError) as exc:
            return fail(error_line(exc))
        items = [(str(source / it.rel), it.label) for it in src.train + src.val]
        best = _rounds(args, source, val_labels, items)
        report(len(items), best, args)
    return 0


def _rounds(args, source: Path, val_labels: str | None, items) -> dict[str, tuple[float, float]]:
    paths = [p for p, _ in items]
    for p in paths:  # warm the page cache: every method reads from memory
        Path(p).read_bytes()
    if not args.no_ffcv:
        importlib.import_module("ffcv.writer")  # untimed: its import (numba compiling) is not FFCV's throughput
    methods = {"floor (decode+resize+encode, 1 process)": lambda tmp: run_floor(paths, 1),
               f"floor (decode+resize+encode, {args.workers} processes)": lambda tmp: run_floor(paths, args.workers),
               "ours (build_records)": lambda tmp: run_ours(source, tmp / "records", args.workers, val_labels)}
    if not args.no_ffcv:
        methods["FFCV DatasetWriter"] = lambda tmp: run_ffcv(items, tmp / "bench.beton", args.workers)
    tmp: dict[str, tempfile.TemporaryDirectory] = {}

    def prepare(name: str) -> None:            # a fresh empty output folder per turn, untimed
        if name in tmp:
            tmp[name].cleanup()
        tmp[name] = tempfile.TemporaryDirectory()

    def turn(name: str, fn):
        def run() -> int:
            fn(Path(tmp[name].name))
            for child in multiprocessing.active_children():   # reap the pool inside the span,
                child.join(timeout=10)                         # so its CPU time is billed here
            return len(paths)
        return run

    # rounds interleave the methods, so load drift hits all alike; each method's fastest round counts
    samples = interleaved({name: turn(name, fn) for name, fn in methods.items()}, args.repeat, prepare=prepare)
    for t in tmp.values():
        t.cleanup()
    return {name: min((s.wall, s.cpu) for s in runs) for name, runs in samples.items()}


def report(n: int, seconds: dict, args) -> None:
    """seconds: {method: (wall s, cpu s)}; ratios are throughput ratios (higher = faster)."""
    from rich.console import Console
    from rich.table import Table
    rates = {k: n / wall for k, (wall, _) in seconds.items()}
    cpu_ms = {k: 1000 * cpu / n for k, (_, cpu) in seconds.items()}
    base = f"floor (decode+resize+encode, {args.workers} processes)"
    ffcv = "FFCV DatasetWriter" if "FFCV DatasetWriter" in seconds else None
    t = Table(title=f"prep throughput: {n} images, {args.workers} workers, best of {args.repeat}")
    for col in ("method", "wall s", "img/s", "vs floor", "vs FFCV", "CPU ms/img", "CPU vs floor"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for k, (wall, _) in seconds.items():
        t.add_row(k, f"{wall:.2f}", f"{rates[k]:.0f}", f"{rates[k] / rates[base]:.2f}",
                  f"{rates[k] / rates[ffcv]:.2f}" if ffcv else "-",
                  f"{cpu_ms[k]:.2f}", f"{cpu_ms[base] / cpu_ms[k]:.2f}" if cpu_ms[k] > 0 else "-")
    Console(width=140).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "workers": args.workers, "images_per_s": rates,
                                               "cpu_ms_per_image": cpu_ms}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
