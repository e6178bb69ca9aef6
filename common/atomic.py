"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every file the project writes for others to read (shards, index files, stats, meta,
checkpoints, metrics) goes through here: write to a temporary name in the same
folder, flush + fsync, then ``os.replace`` onto the final name (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from common.errors import naming


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()   # read once at import: os.umask is process-wide, not thread-safe


@contextlib.contextmanager
def naming_target(path: Path) -> Iterator[None]:
    """An OSError about the temp file of ``path`` (a read-only folder refusing to create it, a
    folder in ``path``'s place refusing the rename) is raised again naming ``path``: the user
    asked for that file, and the temp one is gone by the time the error is read. Errors that
    name another file, or none (``naming`` then), pass through."""
    try:
        yield
    except OSError as exc:
        name = Path(str(exc.filename)).name if exc.filename else ""
        if exc.filename is None or not (name.startswith(f".{path.name}.") and name.endswith(".tmp")):
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def _mkstemp(path: Path) -> tuple[int, str]:
    with naming_target(path):
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on clean exit it replaces ``path``, on error it is
    removed. OSErrors name ``path``, not the temp file (``naming_target``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp(path)
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 minus the umask),
        # so records and checkpoints are readable by the other users a shared box has.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with naming_target(path):
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
    fd, tmp = _mkstemp(path)
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
            with naming_target(path):
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


class LockHeld(BlockingIOError):
    """``lock_folder``'s lock is held by a live process; ``owner`` is what it recorded in the
    lock file ({"pid", "host", "started"}, or {} where it recorded nothing readable)."""

    def __init__(self, path: Path, owner: dict):
        super().__init__(errno.EWOULDBLOCK, "lock held", str(path))
        self.owner = owner

    def who(self) -> str:
        """The owner in words: ``pid 123 on host, since 2026-01-01 12:00:00 UTC``."""
        o = self.owner
        if not o.get("pid"):
            return "an unknown process"
        return f"pid {o['pid']} on {o.get('host', '?')}, since {o.get('started', '?')}"


# The lock files this process holds: a forked child (a prep worker, a DataLoader worker) closes
# its copies at once (os.register_at_fork below). flock belongs to the open file, which every
# forked copy shares: a child that outlived its parent would otherwise hold the lock forever.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (/proc/PID/stat field 22):
    with the pid, it names one process even after the pid is reused. None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _owner_gone(owner: dict) -> bool:
    """True only where the recorded owner surely no longer runs: it ran on this host and its
    pid is gone (or now names a process that started at another time). Another host's owner
    cannot be checked from here: it counts as alive."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname() or not Path("/proc/self").exists():
        return False
    start = _proc_start(pid)
    return start is None or (owner.get("proc_start") is not None and start != owner["proc_start"])


def _try_lock(path: Path) -> int | None:
    """The fd of ``path`` flocked, or None if another open file holds it. Retries where the file
    was replaced (a takeover) between our open and our flock: a lock on a removed file is none."""
    import fcntl
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _record_owner(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_owner_record()).encode() + b"\n", 0)


def lock_folder(path: str | os.PathLike, say: Callable[[str], None] | None = None) -> int:
    """Open and flock ``path`` (a lock file in the folder a process writes), non-blocking, and
    record this process in it (pid, host, start): the file descriptor to hold while writing
    (``os.close`` releases it; so does the kernel when the process dies). Forked children do not
    keep it (``_HELD``). A lock still held although its recorded owner is gone (processes that
    inherited it before children stopped keeping it) is taken over: a fresh lock file replaces
    it, and ``say`` (default: stderr) gets one line naming the old owner. LockHeld (a
    BlockingIOError) if a live process holds it; other OSErrors as ``os.open`` raises them."""
    import fcntl
    path = Path(path)
    fd = _try_lock(path)
    if fd is None:
        # one taker at a time (the folder's own flock): two could otherwise both replace the file
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            fd = _try_lock(path)
            if fd is None:
                owner = _read_owner(path)
                if not _owner_gone(owner):
                    raise LockHeld(path, owner)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.replace(tmp, path)
                (say or (lambda line: print(line, file=sys.stderr, flush=True)))(
                    f"{path}: taking over the lock of pid {owner['pid']} on {owner.get('host')} "
                    f"(since {owner.get('started', '?')}): that process is gone, but processes it "
                    "started still held the lock")
        finally:
            os.close(dir_fd)
    try:
        _record_owner(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD.add(fd)
    return fd


def unlock_folder(fd: int) -> None:
    """Release a lock from ``lock_folder`` (the file stays: removing it would race a new taker)."""
    _HELD.discard(fd)
    os.close(fd)
