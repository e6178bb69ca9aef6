"""Build the records: ImageNet (or the built-in sample set) -> 256x256 JPEG shards + exact stats.

    python prep/build_records.py                      # built-in sample set -> data/records
    python prep/build_records.py --source /data/imagenet --out /data/records [--workers 32]
        [--shard-size 1000] [--quality 90] [--val-labels LOC_val_solution.csv] [--ffcv] [--overwrite]

Writes (see prep/records.py for the readers and README "records" for the details):
    OUT/train/shard-NNNNNN.tar + .idx   train records, globally shuffled (seeded) at write time
    OUT/val/shard-NNNNNN.tar + .idx     val records in sorted order
    OUT/stats.json                      exact RGB mean/std/cov/eigen-decomposition of train pixels
    OUT/mean_image.npy                  per-pixel mean train image (float64 256x256x3, 0-255)
    OUT/skipped.json                    inputs left out, with the reason
    OUT/meta.json                       classes, counts, shards, source, params, versions (written last)
    OUT/train.beton, OUT/val.beton      FFCV's format, with --ffcv

Work is split into shards (one task each, over ``--workers`` processes). A shard's tar and index
appear only when complete (temp name + rename) and its integer pixel sums are kept in
OUT/.partial/ until the build finishes, so a rerun after Ctrl-C or a kill redoes only the
unfinished shards and ends with exactly the output of an uninterrupted run.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import signal
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Callable

import numpy as np

from common.atomic import atomic_open, write_json
from common.config import parse_args
from prep import transform
from prep.records import DEFAULT_RECORDS, DEFAULT_SAMPLE, FORMAT, RecordsError
from prep.shards import ShardWriter
from prep.source import Item, Source, SourceError, scan
from prep.stats import PixelSums, finalize

SAMPLE_MARKER = ".sample-complete.json"
SAMPLE_PARAMS = {"classes": 10, "train_per_class": 100, "val_per_class": 20, "seed": 0}  # the built-in set
PARTIAL = ".partial"
MAX_SHARD = 1_000_000  # mean-image partials are uint32: 255 * MAX_SHARD < 2^32
DEFAULT_SHARD = 1000   # ~25 MB tars for ImageNet: 1282 train shards
MIN_SHARDS = 16        # the automatic shard size keeps at least this many train shards


class PrepError(Exception):
    """A user-facing error of the records build; one line naming the file or flag."""


@dataclass(frozen=True)
class PrepConfig:
    source: str | None = field(default=None, metadata={
        "help": "ImageNet-style folder (train/<wnid>/*, val/...); default: the built-in sample set, "
                "generated into data/sample on first use"})
    out: str | None = field(default=None, metadata={"help": "records folder; default: data/records"})
    workers: int | None = field(default=None, metadata={"help": "processes; default: all cores"})
    shard_size: int | None = field(default=None, metadata={
        "help": "input images per shard; default: 1000, fewer for small sources so that there are "
                f"at least {MIN_SHARDS} train shards to spread over the workers"})
    quality: int = field(default=90, metadata={"help": "JPEG quality of the 256x256 records (1-100)"})
    val_labels: str | None = field(default=None, metadata={
        "help": "labels for a flat SOURCE/val: Kaggle's LOC_val_solution.csv or 'filename wnid' lines"})
    ffcv: bool = field(default=False, metadata={"help": "also write OUT/train.beton and OUT/val.beton (FFCV)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace records in OUT built from another source or with other parameters"})
    seed: int = field(default=0, metadata={"help": "seed of the global train shuffle"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar and summary"})

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size is not None and not 1 <= self.shard_size <= MAX_SHARD:
            raise ValueError(f"--shard-size must be in 1..{MAX_SHARD}, got {self.shard_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")


# ---------------------------------------------------------------- planning

@dataclass(frozen=True)
class ShardTask:
    """One unit of work: write OUT/<split>/shard-<index>.tar from ``items`` (rel, label, key)."""
    split: str
    index: int
    items: tuple[tuple[str, int, str], ...]
    root: str
    out: str
    quality: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}"


def _order(src: Source, seed: int) -> dict[str, list[Item]]:
    """Train shuffled globally (DALI's reader only shuffles within a buffer); val sorted."""
    perm = np.random.default_rng(seed).permutation(len(src.train))
    return {"train": [src.train[i] for i in perm], "val": list(src.val)}


def shard_size_of(cfg: PrepConfig, src: Source) -> int:
    """--shard-size, or the automatic one: depends on the source only, never on --workers."""
    if cfg.shard_size is not None:
        return cfg.shard_size
    return max(1, min(DEFAULT_SHARD, -(-len(src.train) // MIN_SHARDS)))


def plan(src: Source, cfg: PrepConfig, out: Path) -> list[ShardTask]:
    """Every shard of both splits. Keys are the 8-digit position of the input in its split's
    order, so they do not depend on which inputs get skipped or on the worker count."""
    tasks, size = [], shard_size_of(cfg, src)
    for split, items in _order(src, cfg.seed).items():
        for start in range(0, len(items), size):
            chunk = tuple((it.rel, it.label, f"{start + k:08d}") for k, it in enumerate(items[start:start + size]))
            tasks.append(ShardTask(split, start // size, chunk, str(src.root), str(out), cfg.quality))
    return tasks


def params_of(cfg: PrepConfig, src: Source) -> dict:
    """Everything that determines the records' bytes (compared before reusing an OUT)."""
    return {"shard_size": shard_size_of(cfg, src), "quality": cfg.quality, "seed": cfg.seed,
            "val_labels": str(Path(cfg.val_labels).resolve()) if cfg.val_labels else None,
            "size": transform.SIZE, "resample": transform.RESAMPLE_NAME,
            "jpeg_draft_min_factor": transform.DRAFT_FACTOR, "source_digest": src.digest()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "pillow", "nvidia-dali-cuda120", "ffcv"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    from PIL import features
    out["libjpeg"] = features.version("jpg")
    return out


# ---------------------------------------------------------------- one shard (runs in a worker)

def _partial_path(out: Path, split: str, name: str, ext: str) -> Path:
    return out / PARTIAL / split / f"{name}.{ext}"


def write_shard(task: ShardTask, tick: Callable[[int], None]) -> int:
    """Decode, resize, encode and write one shard; record its skips and pixel sums in .partial/.

    The partial JSON is written last: its presence is what marks the shard done.
    """
    out, root = Path(task.out), Path(task.root)
    tar = out / task.split / f"{task.name}.tar"
    sums, skipped = PixelSums(), []
    mean_sum = np.zeros((transform.SIZE, transform.SIZE, 3), np.uint32) if task.split == "train" else None
    with ShardWriter(tar, tar.with_suffix(".idx")) as writer:
        for rel, label, key in task.items:
            try:
                img = transform.decode_record_image((root / rel).read_bytes())
            except (transform.ImageError, OSError) as exc:
                skipped.append({"path": rel, "reason": str(exc)})
                tick(1)
                continue
            if mean_sum is not None:  # train: exact sums of the pixels before JPEG encoding
                sums.add_pil(img)
                mean_sum += np.asarray(img)
            writer.add(key, transform.encode_jpeg(img, task.quality), label)
            tick(1)
        if writer.count:
            writer.commit()
        else:  # nothing decodable: no shard (DALI cannot index an empty tar)
            writer.abort()
    if mean_sum is not None:
        with atomic_open(_partial_path(out, task.split, task.name, "npy"), "wb") as fh:
            np.save(fh, mean_sum)
    write_json(_partial_path(out, task.split, task.name, "json"), {
        "records": writer.count, "tar": f"{task.split}/{tar.name}" if writer.count else None,
        "skipped": skipped, "sums": sums.to_json()})
    return len(task.items)


_SHARED_COUNTER = None  # set in each pool worker by _init_worker: images done, for the progress bar


def _init_worker(counter) -> None:
    global _SHARED_COUNTER
    _SHARED_COUNTER = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, once


def _tick_shared(n: int) -> None:
    with _SHARED_COUNTER.get_lock():
        _SHARED_COUNTER.value += n


def _pool_task(task: ShardTask) -> tuple[str, int]:
    write_shard(task, _tick_shared)
    return task.split, task.index


# ---------------------------------------------------------------- the build

def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    rate = TextColumn("{task.fields[rate]:>7.0f} img/s")
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), rate,
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)


def run_tasks(tasks: list[ShardTask], workers: int, progress: bool,
              on_shard: Callable[[str, int], None] | None = None) -> None:
    """Run every shard task (in-process for one worker, else over a process pool)."""
    total = sum(len(t.items) for t in tasks)
    if workers == 1 or len(tasks) <= 1:
        with _progress(progress) as bar:
            job, done, t0 = bar.add_task("records", total=total, rate=0.0), 0, time.perf_counter()

            def tick(n: int) -> None:
                nonlocal done
                done += n
                bar.update(job, completed=done, rate=done / max(time.perf_counter() - t0, 1e-9))

            for task in tasks:
                write_shard(task, tick)
                if on_shard:
                    on_shard(task.split, task.index)
        return
    counter = multiprocessing.Value("q", 0)
    # fork the workers before the progress bar starts its refresh thread
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool, \
            _progress(progress) as bar:
        job, t0 = bar.add_task("records", total=total, rate=0.0), time.perf_counter()
        results = pool.imap_unordered(_pool_task, tasks, chunksize=1)
        for _ in tasks:
            while True:
                done = counter.value
                bar.update(job, completed=done, rate=done / max(time.perf_counter() - t0, 1e-9))
                try:
                    split, index = results.next(timeout=0.25)
                    break
                except multiprocessing.TimeoutError:
                    continue
            if on_shard:
                on_shard(split, index)
        bar.update(job, completed=counter.value)


def _known_entries(out: Path) -> list[Path]:
    names = ("train", "val", PARTIAL, "meta.json", "stats.json", "skipped.json", "mean_image.npy",
             "train.beton", "val.beton")
    return [out / n for n in names if (out / n).exists()]


def _describe_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])


def _read_identity(out: Path) -> dict | None:
    """{source, params} of a finished (meta.json) or unfinished (.partial) build in OUT, if any."""
    for path in (out / "meta.json", out / PARTIAL / "identity.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return {"source": data["source"], "params": dict(data["params"])}
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def _check_complete(out: Path) -> None:
    """A finished build must still have every file readers need (its partials are gone)."""
    meta = json.loads((out / "meta.json").read_text())
    needed = [out / n for n in ("stats.json", "skipped.json", "mean_image.npy")]
    for rel in meta["shards"]["train"] + meta["shards"]["val"]:
        needed += [out / rel, (out / rel).with_suffix(".idx")]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise PrepError(f"--out {out}: finished build with missing files ({missing[0]}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); "
                        "pass --overwrite to rebuild")


def prepare_out(out: Path, identity: dict, overwrite: bool) -> bool:
    """Check OUT against what we are about to build; returns True if OUT is already complete.

    OUT may be missing or empty, a finished or unfinished build of the same source and
    params (reused / resumed), or anything else only with --overwrite (then our entries go).
    """
    meta_path = out / "meta.json"
    old = _read_identity(out)
    if old == identity:
        if meta_path.is_file():
            _check_complete(out)
            return True
        return False
    entries = _known_entries(out) if out.is_dir() else []
    if entries and not overwrite:
        if old:
            diff = _describe_diff({**old["params"], "source": old["source"]},
                                  {**identity["params"], "source": identity["source"]})
            what = f"records built from another source or with other parameters ({diff})"
        else:
            what = f"unrecognised content ({', '.join(p.name for p in entries)})"
        raise PrepError(f"--out {out}: holds {what}; pass --overwrite to replace it or pick another folder")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return False


def _collect(out: Path, tasks: list[ShardTask]) -> dict:
    """Merge every shard's partial: counts, shard lists, skips, exact sums, mean-image sum."""
    sums, skipped = PixelSums(), []
    counts, shards = {"train": 0, "val": 0}, {"train": [], "val": []}
    mean_sum = np.zeros((transform.SIZE, transform.SIZE, 3), np.int64)
    for task in tasks:
        part = json.loads(_partial_path(out, task.split, task.name, "json").read_text())
        counts[task.split] += part["records"]
        skipped += [{"split": task.split, **s} for s in part["skipped"]]
        if part["tar"]:
            shards[task.split].append(part["tar"])
        if task.split == "train":
            sums.merge(PixelSums.from_json(part["sums"]))
            mean_sum += np.load(_partial_path(out, task.split, task.name, "npy"))
    skipped.sort(key=lambda s: (s["split"], s["path"]))
    return {"sums": sums, "skipped": skipped, "counts": counts, "shards": shards, "mean_sum": mean_sum}


def _finish(out: Path, src: Source, identity: dict, got: dict) -> dict:
    """Write stats, mean image, skip list, then meta.json (the completion marker)."""
    if got["counts"]["train"] == 0:
        raise PrepError(f"--source {src.root}: no decodable training image")
    stats = finalize(got["sums"])
    write_json(out / "stats.json", stats)
    with atomic_open(out / "mean_image.npy", "wb") as fh:
        np.save(fh, got["mean_sum"] / got["counts"]["train"])  # float64, 0-255 scale
    write_json(out / "skipped.json", got["skipped"])
    meta = {"format": FORMAT, "classes": list(src.classes), "counts": got["counts"],
            "shards": got["shards"], "source": identity["source"], "params": identity["params"],
            "versions": versions()}
    write_json(out / "meta.json", meta)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return stats


def _clean_temps(out: Path) -> None:
    """Remove half-written shards of an interrupted run (hidden temp names)."""
    for split in ("train", "val"):
        folder = out / split
        if folder.is_dir():
            for tmp in folder.glob(".shard-*.tmp"):
                tmp.unlink(missing_ok=True)


def ensure_sample(root: Path, progress: bool) -> None:
    """Generate the built-in sample set into ``root`` unless a complete one is there."""
    if (root / SAMPLE_MARKER).is_file():
        return
    from prep.sample import make_sample_set
    if progress:
        print(f"generating the built-in sample set into {root} ...", file=sys.stderr)
    make_sample_set(root, **SAMPLE_PARAMS)
    write_json(root / SAMPLE_MARKER, SAMPLE_PARAMS)


def build(cfg: PrepConfig, *, on_shard: Callable[[str, int], None] | None = None) -> dict:
    """Build (or resume, or reuse) the records described by ``cfg``; returns a summary dict.

    ``on_shard(split, index)`` is called in this process after each finished shard (tests use
    it to interrupt a build). Raises PrepError / SourceError with a one-line message.
    """
    t0 = time.perf_counter()
    if cfg.ffcv and importlib.util.find_spec("ffcv") is None:
        raise PrepError("--ffcv needs the ffcv package (pip install '.[ffcv]'; see scripts/setup.sh)")
    source = Path(cfg.source) if cfg.source else DEFAULT_SAMPLE
    out = Path(cfg.out) if cfg.out else DEFAULT_RECORDS
    if cfg.source is None:
        ensure_sample(source, cfg.progress)
    src = scan(source, cfg.val_labels)
    identity = {"source": str(source.resolve()), "params": params_of(cfg, src)}
    tasks = plan(src, cfg, out)
    if prepare_out(out, identity, cfg.overwrite):
        ffcv = _maybe_ffcv(cfg, out, src, tasks)
        return _summary(out, reused=True, written=0, seconds=time.perf_counter() - t0, ffcv=ffcv)
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / PARTIAL / split).mkdir(parents=True, exist_ok=True)
    write_json(out / PARTIAL / "identity.json", identity)
    _clean_temps(out)
    todo = [t for t in tasks if not _partial_path(out, t.split, t.name, "json").is_file()]
    workers = min(cfg.workers or os.cpu_count() or 1, max(len(todo), 1))
    t_run = time.perf_counter()
    run_tasks(todo, workers, cfg.progress, on_shard)
    run_s = time.perf_counter() - t_run
    _finish(out, src, identity, _collect(out, tasks))
    written = sum(len(t.items) for t in todo)
    ffcv = _maybe_ffcv(cfg, out, src, tasks)
    return _summary(out, reused=False, written=written, seconds=time.perf_counter() - t0, ffcv=ffcv,
                    rate=written / run_s if run_s > 0 else 0.0)


def _maybe_ffcv(cfg: PrepConfig, out: Path, src: Source, tasks: list[ShardTask]) -> list[str]:
    if not cfg.ffcv:
        return []
    from prep.ffcv_writer import write_betons
    return write_betons(out, src.root, tasks, cfg.quality, cfg.workers or os.cpu_count() or 1)


def _summary(out: Path, *, reused: bool, written: int,
             seconds: float, ffcv: list[str], rate: float = 0.0) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    skipped = json.loads((out / "skipped.json").read_text())
    return {"out": str(out), "source": meta["source"], "classes": len(meta["classes"]),
            "counts": meta["counts"], "shards": {k: len(v) for k, v in meta["shards"].items()},
            "skipped": len(skipped), "skipped_files": skipped, "reused": reused,
            "images_processed": written, "images_per_s": rate, "seconds": seconds,
            "stats": json.loads((out / "stats.json").read_text()), "ffcv": ffcv}


# ---------------------------------------------------------------- CLI

def print_summary(summary: dict) -> None:
    """Counts, skips, throughput and the eigen-colours as rich tables."""
    from rich.table import Table

    from common.console import make_console
    console = make_console()
    t = Table(title=f"records in {summary['out']}" + (" (already complete, reused)" if summary["reused"] else ""))
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("classes", str(summary["classes"]))
    for split in ("train", "val"):
        t.add_row(f"{split} records / shards", f"{summary['counts'][split]} / {summary['shards'][split]}")
    t.add_row("skipped inputs (skipped.json)", str(summary["skipped"]))
    t.add_row("images processed this run", str(summary["images_processed"]))
    t.add_row("throughput", f"{summary['images_per_s']:.0f} img/s")
    t.add_row("wall time", f"{summary['seconds']:.1f} s")
    for path in summary["ffcv"]:
        t.add_row("FFCV", path)
    console.print(t)
    for s in summary["skipped_files"][:10]:
        console.print(f"  skipped {s['split']}/{s['path'].split('/', 1)[-1]}: {s['reason']}")
    st = summary["stats"]
    e = Table(title=f"RGB statistics of {st['pixels']:,} train pixels (0-255 scale; λ in 0-255²)")
    for col in ("", "R", "G", "B"):
        e.add_column(col, justify="right")
    e.add_row("mean", *(f"{v:.3f}" for v in st["mean"]))
    e.add_row("std", *(f"{v:.3f}" for v in st["std"]))
    vec = np.asarray(st["eigvec"])
    for i, val in enumerate(st["eigval"]):
        e.add_row(f"eigen-colour {i + 1}: λ={val:.2f}", *(f"{v:+.4f}" for v in vec[:, i]))
    console.print(e)


def main(argv=None) -> int:
    cfg = parse_args(PrepConfig, argv, prog="build_records.py", description=__doc__.splitlines()[0])
    try:
        summary = build(cfg)
    except (PrepError, SourceError, RecordsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    if cfg.progress:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
