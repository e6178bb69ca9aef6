"""The worker side of a build: one shard per task, run in-process or over a process pool.

A shard's tar and index appear only when complete (temp name + rename), then its skips and
integer pixel sums go to OUT/.partial/<split>/<shard>.json (+ .npy, the train mean-image sum),
the JSON last: its presence (with its tar and .npy) is what marks the shard done for a resume.
"""
from __future__ import annotations

import json
import multiprocessing
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common.atomic import atomic_open, write_json
from prep import transform
from prep.plan import ShardTask
from prep.shards import ShardWriter
from prep.stats import PixelSums

PARTIAL = ".partial"


def partial_path(out: Path, split: str, name: str, ext: str) -> Path:
    return Path(out) / PARTIAL / split / f"{name}.{ext}"


def shard_done(out: Path, task: ShardTask) -> bool:
    """A resumable finished shard: readable partial JSON, its tar and index, its mean-image sum."""
    try:
        part = json.loads(partial_path(out, task.split, task.name, "json").read_text())
        ok = isinstance(part, dict) and {"records", "tar", "skipped", "sums"} <= set(part)
    except (OSError, ValueError):
        return False
    if ok and part["tar"]:
        tar = Path(out) / part["tar"]
        ok = tar.is_file() and tar.with_suffix(".idx").is_file()
    if ok and task.split == "train":
        ok = partial_path(out, task.split, task.name, "npy").is_file()
    return ok


def write_shard(task: ShardTask, tick: Callable[[int], None]) -> int:
    """Decode, resize, encode and write one shard; record its skips and pixel sums in .partial/."""
    out, root = Path(task.out), Path(task.root)
    tar = out / task.split / f"{task.name}.tar"
    sums, skipped = PixelSums(), []
    mean_sum = np.zeros((transform.SIZE, transform.SIZE, 3), np.uint32) if task.split == "train" else None
    with ShardWriter(tar, tar.with_suffix(".idx")) as writer:
        for rel, label, key in task.items:
            try:
                img = transform.decode_record_image((root / rel).read_bytes())
            except transform.ImageError as exc:
                skipped.append({"path": rel, "reason": str(exc)})
                tick(1)
                continue
            except OSError as exc:  # unreadable (permissions), vanished since the scan, I/O error
                skipped.append({"path": rel, "reason": f"cannot read: {exc.strerror or exc}"})
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
        with atomic_open(partial_path(out, task.split, task.name, "npy"), "wb") as fh:
            np.save(fh, mean_sum)
    write_json(partial_path(out, task.split, task.name, "json"), {
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


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    rate = TextColumn("{task.fields[rate]:>7.0f} img/s")
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), rate,
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)


def _run_inline(tasks: list[ShardTask], progress: bool, on_shard) -> None:
    with _progress(progress) as bar:
        job, done, t0 = bar.add_task("records", total=sum(len(t.items) for t in tasks), rate=0.0), 0, time.perf_counter()

        def tick(n: int) -> None:
            nonlocal done
            done += n
            bar.update(job, completed=done, rate=done / max(time.perf_counter() - t0, 1e-9))

        for task in tasks:
            write_shard(task, tick)
            if on_shard:
                on_shard(task.split, task.index)


def _run_pool(tasks: list[ShardTask], workers: int, progress: bool, on_shard) -> None:
    counter = multiprocessing.Value("q", 0)
    # fork the workers before the progress bar starts its refresh thread
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool, \
            _progress(progress) as bar:
        job, t0 = bar.add_task("records", total=sum(len(t.items) for t in tasks), rate=0.0), time.perf_counter()
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


def run_tasks(tasks: list[ShardTask], workers: int, progress: bool,
              on_shard: Callable[[str, int], None] | None = None) -> None:
    """Run every shard task (in-process for one worker, else over a process pool);
    ``on_shard(split, index)`` is called in this process after each finished shard."""
    if workers == 1 or len(tasks) <= 1:
        _run_inline(tasks, progress, on_shard)
    else:
        _run_pool(tasks, workers, progress, on_shard)
