"""The output folder: one build at a time (a lock), reuse/resume/refuse, stale leftovers removed.

OUT may be missing or empty, a finished or unfinished build of the same source and params
(reused / resumed; a finished one that lost shard files is refused, or with --repair has them
rebuilt: prep/repair.py), or anything else only with --overwrite (then our entries go; so does
a finished build that lost files). Problems with
OUT itself (a file, read-only, no permission, another build holding the lock) are PrepErrors:
one line, and any folder this build created is removed again.
"""
from __future__ import annotations

import contextlib
import errno
import json
import shutil
from pathlib import Path
from typing import Iterator

from common.atomic import LockHeld, lock_folder, unlock_folder
from prep.config import PrepError
from prep.workers import PARTIAL
from records.folder import statistics_problems
from records.format import build_command

LOCK = ".build.lock"
KNOWN = ("train", "val", PARTIAL, "meta.json", "stats.json", "stats.png", "skipped.json", "mean_image.npy",
         "train.beton", "val.beton")


def _os_message(out: Path, exc: OSError) -> str:
    what = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device",
            errno.ENOTDIR: "a path component is a file, not a folder"}.get(exc.errno, exc.strerror or str(exc))
    where = exc.filename if exc.filename else out
    return f"--out {where}: {what}"


@contextlib.contextmanager
def locked_out(out: Path) -> Iterator[None]:
    """Create OUT if needed and hold OUT/.build.lock (flock, released by the kernel if the process
    dies, so a killed build never blocks the next; the workers do not keep it, and a lock whose
    recorded owner is gone is taken over: common.atomic.lock_folder); on any error remove what
    this call created."""
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out {out}: is a file, not a folder")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = lock_folder(out / LOCK)
    except BlockingIOError as exc:
        who = f" by {exc.who()}" if isinstance(exc, LockHeld) else ""
        raise PrepError(f"--out {out}: another build is writing into it (lock {out / LOCK} is held{who}); "
                        "wait for it to finish or pick another folder") from None
    except OSError as exc:
        _remove_created(created)
        raise PrepError(_os_message(out, exc)) from None
    try:
        try:
            yield
        except OSError as exc:  # OUT went bad mid-build (full disk, remounted read-only)
            raise PrepError(_os_message(out, exc)) from None
    except BaseException:
        if created and not any((out / n).exists() for n in ("meta.json", PARTIAL)):
            _remove_created(created)
        raise
    finally:
        unlock_folder(fd)


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first
        shutil.rmtree(p, ignore_errors=True)


def known_entries(out: Path) -> list[Path]:
    return [out / n for n in KNOWN if (out / n).exists()]


def _describe_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])


def read_identity(out: Path) -> dict | None:
    """{source, params} of a finished (meta.json) or unfinished (.partial) build in OUT, if any."""
    for path in (out / "meta.json", out / PARTIAL / "identity.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return {"source": data["source"], "params": dict(data["params"])}
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def _missing(paths: list[Path]) -> str:
    return f"{paths[0]}{f' and {len(paths) - 1} more' if len(paths) > 1 else ''}"


def _check_complete(out: Path, repair: bool) -> None:
    """A finished build must still have every file readers need (its partials are gone). Its
    shards and its statistics files can be rebuilt (--repair); skipped.json only by a whole build."""
    meta = json.loads((out / "meta.json").read_text())
    if not (out / "skipped.json").is_file():
        raise PrepError(f"--out {out}: finished build with missing files ({out / 'skipped.json'}); "
                        "pass --overwrite to rebuild it")
    lost = [out / rel for rel in (meta.get("keys") or {}).values() if not (out / rel).is_file()]
    if lost and not repair:
        raise PrepError(f"--out {out}: finished build with missing files ({_missing(lost)}); "
                        "rerun the same command with --repair to rewrite them")
    if not repair and (problems := statistics_problems(out, meta)):
        path, why = problems[0]
        raise PrepError(f"{path}: {why}; rerun the same command with --repair to rebuild the statistics")
    shards = [p for rel in meta["shards"]["train"] + meta["shards"]["val"]
              for p in (out / rel, (out / rel).with_suffix(".idx"))]
    missing = [p for p in shards if not p.is_file()]
    if missing and not repair:
        raise PrepError(f"--out {out}: finished build with missing shard files ({_missing(missing)}); "
                        "rerun the same command with --repair to rebuild them")


def prepare_out(out: Path, identity: dict, overwrite: bool, repair: bool = False) -> bool:
    """Check OUT against what we are about to build; returns True if OUT is already complete."""
    extra = ("--repair",) if repair else ()
    old = read_identity(out)
    if old == identity:
        if not (out / "meta.json").is_file():
            return False                      # unfinished: resume it
        try:
            _check_complete(out, repair)
            # a build killed after writing meta.json (its completion mark) left these
            remove_temp_files(out)
            shutil.rmtree(out / PARTIAL, ignore_errors=True)
            return True
        except PrepError:
            if not overwrite:
                raise
        # an incomplete finished build with --overwrite: rebuilt from scratch, below
    entries = known_entries(out) if out.is_dir() else []
    if entries and not overwrite:
        if old:
            diff = _describe_diff({**old["params"], "source": old["source"]},
                                  {**identity["params"], "source": identity["source"]})
            what = f"records built from another source or with other parameters ({diff})"
            same = f"; to resume, repair or keep them: {build_command(str(out), old['source'], old['params'], *extra)}"
        else:
            what, same = f"unrecognised content ({', '.join(p.name for p in entries)})", ""
        raise PrepError(f"--out {out}: holds {what}; pass --overwrite to replace it or pick another folder{same}")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return False


def remove_temp_files(out: Path) -> None:
    """Remove the hidden temp files of atomic writes (``.NAME.*.tmp``) anywhere in OUT: what a
    killed writer leaves. Only while no writer of this build is running (OUT's lock is held)."""
    for folder in (out, out / "train", out / "val", out / PARTIAL, out / PARTIAL / "train", out / PARTIAL / "val"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def clean_stale(out: Path, keep: set[str]) -> None:
    """Remove what a killed build leaves: temp files (``remove_temp_files``), and partials of
    shards that are not in this build's plan (``keep``: names like ``train/shard-000003``)."""
    remove_temp_files(out)
    for split in ("train", "val"):
        folder = out / PARTIAL / split
        if folder.is_dir():
            for p in folder.iterdir():
                if f"{split}/{p.name.split('.')[0]}" not in keep:
                    p.unlink(missing_ok=True)
