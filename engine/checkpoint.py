"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain containers only (no pickled classes), so
loading a foreign or tampered file can never execute code: the RNG states are uint8
tensors, the config a plain dict. Written through common.atomic (temp file + fsync +
rename), so ``last.pt`` is always either the previous complete checkpoint or the new one.

Contents (FORMAT below): model state_dict (placement-independent keys), optimiser and
schedule state, epoch (completed epochs), batch (steps done inside the current epoch when
saved mid-epoch, else 0), step (global optimiser steps), best validation top-1 error,
per-rank RNG states, loader seed, partial-epoch sums, and the resolved config.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from common.atomic import write_bytes

FORMAT = "dali-alexnet-checkpoint/1"


class CheckpointError(Exception):
    """A checkpoint is missing, truncated, foreign or from an incompatible run; one line."""


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise into memory first, then write atomically: no half-written file ever exists."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    write_bytes(path, buf.getvalue())


def link(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` the same file as ``src`` (best.pt = this epoch's last.pt) without copying
    ~0.5 GB: a hard link under a temp name, renamed over ``dst`` atomically. The next save of
    ``src`` replaces its name with a new file, so ``dst`` keeps these bytes."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:                      # a filesystem without hard links: copy
        write_bytes(tmp, src.read_bytes())
    os.replace(tmp, dst)


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save``; anything else raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or foreign file): {reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {FORMAT!r})")
    return state


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states as tensors (CPU generator + every CUDA device's)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
