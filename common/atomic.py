"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every file the project writes for others to read (shards, index files, stats, meta,
checkpoints, metrics) goes through here: write to a temporary name in the same
folder, flush + fsync, then ``os.replace`` onto the final name (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from common.errors import naming


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()   # read once at import: os.umask is process-wide, not thread-safe


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on clean exit it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 minus the umask),
        # so records and checkpoints are readable by the other users a shared box has.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_unsynced(path: str | os.PathLike, data: bytes) -> tuple[Path, Path]:
    """The first half of an atomic write: ``data`` in a temp file beside ``path``, not yet
    flushed to disk nor renamed. Returns (temp, path) for ``publish``; until then readers see
    the old ``path`` (or none), and a killed run leaves only a ``.NAME.*.tmp`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with naming(path), os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp), path


def publish(pending: list[tuple[Path, Path]]) -> None:
    """The second half: fsync every temp file, then rename each onto its path, in list order
    (put the file that marks the others complete last). The fsyncs can run in another process
    than the writes: prep's workers hand them to the parent, so a worker does not wait on the
    disk (the parent is otherwise idle) and keeps decoding. On failure every temp not yet
    renamed is removed."""
    try:
        for tmp, path in pending:
            with naming(path):            # fsync's error names no file: name the one being written
                _fsync(tmp)
        for tmp, path in pending:
            os.replace(tmp, path)
        for folder in dict.fromkeys(path.parent for _, path in pending):
            with naming(folder):
                _fsync(folder)            # the renames themselves survive a power cut
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def json_text(obj: Any) -> str:
    """How every JSON file of the project is laid out: indented, keys in insertion order."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json_text(obj))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line by rewriting the file atomically (metrics files are small)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    write_text(path, old + line.rstrip("\n") + "\n")


def lock_folder(path: str | os.PathLike) -> int:
    """Open and flock ``path`` (a lock file in the folder a process writes), non-blocking: the
    file descriptor to hold while writing (``os.close`` releases it; so does the kernel when the
    process dies, so a killed process never blocks the next). BlockingIOError if another process
    holds it; other OSErrors as ``os.open`` raises them."""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd
