"""The worker side of a build: one shard per task, run in-process or over a process pool.

A shard's tar and index appear only when complete (temp name + rename), then its skips and
integer pixel sums go to OUT/.partial/<split>/<shard>.json (+ .npy, the train mean-image sum),
the JSON last: its presence (with its tar and .npy) is what marks the shard done for a resume.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

import numpy as np

from common.atomic import json_text, publish, write_unsynced
from prep import transform
from prep.config import PrepError
from prep.plan import ShardTask
from prep.shards import ShardWriter
from prep.stats import ImageSum, PixelSums

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


class _Counter:
    """In place of a ShardWriter where only the statistics are recomputed: counts, writes nothing."""
    crc32 = None

    def __init__(self):
        self.count = 0

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        self.count += 1

    def close(self) -> list:
        return []

    def abort(self) -> None:
        pass

    def __enter__(self) -> "_Counter":
        return self

    def __exit__(self, *exc) -> None:
        pass


def write_shard(task: ShardTask, tick: Callable[[int], None]) -> list[tuple[Path, Path]]:
    """Decode, resize, encode and write one shard and its skips and pixel sums (.partial/),
    all under temp names: the (temp, final) pairs for ``common.atomic.publish``, the partial
    JSON last (``shard_done`` takes it as the mark of a finished shard)."""
    out, root = Path(task.out), Path(task.root)
    tar = out / task.split / f"{task.name}.tar"
    sums, skipped = PixelSums(), []
    mean_sum = ImageSum((transform.SIZE, transform.SIZE, 3)) if task.split == "train" else None
    pending: list[tuple[Path, Path]] = []
    try:
        with (_Counter() if task.stats_only else ShardWriter(tar, tar.with_suffix(".idx"))) as writer:
            for rel, label, key in task.items:
                try:
                    pixels = transform.decode_record((root / rel).read_bytes())
                except transform.ImageError as exc:
                    skipped.append({"path": rel, "reason": str(exc)})
                    tick(1)
                    continue
                except OSError as exc:  # unreadable (permissions), vanished since the scan, I/O error
                    skipped.append({"path": rel, "reason": f"cannot read: {exc.strerror or exc}"})
                    tick(1)
                    continue
                if mean_sum is not None:  # train: exact sums of the pixels before JPEG encoding
                    sums.add_image(pixels)
                    mean_sum.add(pixels)
                writer.add(key, b"" if task.stats_only else transform.encode_jpeg(pixels, task.quality), label)
                tick(1)
            if writer.count:
                pending += writer.close()
            else:  # nothing decodable: no shard (DALI cannot index an empty tar)
                writer.abort()
        if mean_sum is not None:
            buf = io.BytesIO()
            np.save(buf, mean_sum.total())
            pending.append(write_unsynced(partial_path(out, task.split, task.name, "npy"), buf.getvalue()))
        pending.append(write_unsynced(partial_path(out, task.split, task.name, "json"), json_text({
            "records": writer.count, "tar": f"{task.split}/{tar.name}" if writer.count else None,
            "skipped": skipped, "sums": sums.to_json(),
            "crc32": writer.crc32 if writer.count else None}).encode()))
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    return pending


# Set in each pool worker by _init_worker: images done (for the progress bar), and per task
# the pid of the worker writing it (0: not started or finished), to name the shard of a dead worker.
_SHARED_COUNTER = None
_RUNNING = None


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when the build's process dies (Linux's
    PR_SET_PDEATHSIG), whatever killed it (kill -9 included): an orphaned worker would sit idle
    forever. If the parent is already gone (it died before the prctl), exit at once. Elsewhere
    than Linux nothing is set: the parent's own handlers stop the workers on SIGINT/SIGTERM."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)        # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(counter, running, parent: int) -> None:
    global _SHARED_COUNTER, _RUNNING
    _SHARED_COUNTER, _RUNNING = counter, running
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is not the worker's


def _tick_shared(n: int) -> None:
    with _SHARED_COUNTER.get_lock():
        _SHARED_COUNTER.value += n


def _pool_task(ordinal: int, task: ShardTask) -> tuple[str, int, list[tuple[Path, Path]]]:
    """One shard in a worker; the parent publishes (fsyncs and renames) its files."""
    _RUNNING[ordinal] = os.getpid()
    pending = write_shard(task, _tick_shared)
    _RUNNING[ordinal] = 0
    return task.split, task.index, pending


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
            publish(write_shard(task, tick))
            if on_shard:
                on_shard(task.split, task.index)


def _run_pool(tasks: list[ShardTask], workers: int, progress: bool, on_shard) -> None:
    """The tasks over a ProcessPoolExecutor, not multiprocessing.Pool: a Pool silently replaces a
    worker that dies (out-of-memory killer, a crash in a decoder) and loses its task, so the build
    would wait forever; the executor fails every pending task with BrokenProcessPool instead.
    The start method stays the platform default (fork on Linux up to Python 3.13); see the note
    on forked workers and OpenCV's threads in prep/transform.py."""
    counter = multiprocessing.Value("q", 0)
    running = multiprocessing.RawArray("q", len(tasks))  # each slot is written by one worker at a time
    before = {p.pid for p in multiprocessing.active_children()}
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(counter, running, os.getpid()))
    procs: list[multiprocessing.Process] = []
    # Ctrl-C is caught from before the first submit: one landing before `procs` is known would stop
    # nothing (the workers ignore SIGINT from their initializer on)
    with _CtrlC() as ctrl_c:
        try:
            # every worker is started by the submits, before the progress bar starts its refresh thread;
            # the clock starts before them: the workers decode from their first submit on
            t0 = time.perf_counter()
            futures = [pool.submit(_pool_task, i, task) for i, task in enumerate(tasks)]
            procs = [p for p in multiprocessing.active_children() if p.pid not in before]
            with _progress(progress) as bar:
                job = bar.add_task("records", total=sum(len(t.items) for t in tasks), rate=0.0)
                pending = set(futures)
                while pending:
                    ctrl_c.check()
                    finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    done = _images_done(counter)
                    bar.update(job, completed=done, rate=done / max(time.perf_counter() - t0, 1e-9))
                    for future in finished:
                        split, index, files = future.result()  # a worker's exception is raised here
                        publish(files)
                        if on_shard:
                            on_shard(split, index)
                done = _images_done(counter)
                bar.update(job, completed=done, rate=done / max(time.perf_counter() - t0, 1e-9))
        except BrokenProcessPool:
            _stop(pool, procs)
            raise PrepError(_death_message(tasks, procs, running)) from None
        except BaseException:  # Ctrl-C, a worker's exception, on_shard's exception
            _stop(pool, procs)
            raise
    pool.shutdown()


class Stopped(KeyboardInterrupt):
    """The build was stopped by a signal (SIGINT: Ctrl-C, SIGTERM: kill, a job scheduler):
    ``signum`` names it. A KeyboardInterrupt, so every cleanup that handles Ctrl-C handles it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum, frame) -> None:
    """A signal handler: raise Stopped where the main thread is."""
    raise Stopped(signum)


class _CtrlC:
    """Ctrl-C (SIGINT) or SIGTERM while the pool runs, raised only where this process holds no lock.

    An exception raised at an arbitrary bytecode can land inside concurrent.futures' wait()
    between taking and releasing a future's lock, and the shutdown that follows then waits on
    that lock forever. So the signal only sets a flag, and ``check()`` raises Stopped at the
    top of the wait loop (at most 0.25 s later). Installed only in the main thread and only
    where the signal is not ignored: a nohup'ed build keeps ignoring SIGINT."""

    def __init__(self) -> None:
        self.hit, self._old = 0, {}

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                    self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.hit = self.hit or signum

    def check(self) -> None:
        if self.hit == signal.SIGINT:
            raise KeyboardInterrupt
        if self.hit:
            raise Stopped(self.hit)

    def __exit__(self, *exc) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)


def _images_done(counter) -> int:
    """The progress counter read WITHOUT its lock (``counter.value`` takes it): a worker killed
    inside _tick_shared dies holding the lock, and this process must still notice the death.
    An aligned 64-bit read is never torn; the workers' increments keep the lock."""
    return counter.get_obj().value


def _stop(pool: ProcessPoolExecutor, procs: list[multiprocessing.Process]) -> None:
    """Kill the workers mid-shard (as Pool.terminate did) and wait for them: finished shards are
    complete on disk, the others are redone by the next build."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
    for p in procs:
        p.join()


def _death_message(tasks: list[ShardTask], procs: list[multiprocessing.Process], running) -> str:
    """One line: how the worker died and which shard it was writing. The executor SIGTERMs the
    other workers once one is gone, so the dead one is the one that did not end by SIGTERM
    (if every one did, e.g. after a `kill PID`, each SIGTERMed worker's shard is named)."""
    codes = {p.pid: p.exitcode for p in procs if p.exitcode not in (None, 0)}
    dead = {pid: c for pid, c in codes.items() if c != -signal.SIGTERM} or codes
    how = ", ".join(sorted({_exit_words(c) for c in dead.values()})) or "unknown cause"
    shards = [f"{t.split}/{t.name}" for i, t in enumerate(tasks) if running[i] and running[i] in dead]
    out = tasks[0].out if tasks else "?"
    where = f" while writing shard {' or '.join(shards)}" if shards else ""
    return (f"--out {out}: a worker process died ({how}){where}; "
            "finished shards are kept, rerun the same command to resume")


def _exit_words(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    hint = ": often the out-of-memory killer" if -code == signal.SIGKILL else ""
    return f"signal {-code}, {name}{hint}"


def run_tasks(tasks: list[ShardTask], workers: int, progress: bool,
              on_shard: Callable[[str, int], None] | None = None) -> None:
    """Run every shard task (in-process for one worker, else over a process pool);
    ``on_shard(split, index)`` is called in this process after each finished shard.
    A worker process that dies raises PrepError (one line naming the shard) once every worker
    is stopped; temp files of the stopped writers are left for the caller to remove."""
    if workers == 1 or len(tasks) <= 1:
        _run_inline(tasks, progress, on_shard)
    else:
        _run_pool(tasks, workers, progress, on_shard)
