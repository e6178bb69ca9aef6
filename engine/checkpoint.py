"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain containers only (no pickled classes), so
loading a foreign or tampered file can never execute code: the RNG states are uint8
tensors, the config a plain dict. Written through common.atomic (temp file + fsync +
rename), so ``last.pt`` is always either the previous complete checkpoint or the new one.

Contents (FORMAT below): "model" (state_dict, placement-independent keys), "optimizer"
(its state_dict: the momentum buffers), "config" (the resolved TrainConfig as a dict), and
the training state, ``engine.state.TrainState.state_dict()`` at the top level: epoch
(completed), step (global optimiser steps), batch (steps done inside the current epoch),
the epoch's running sums, history, schedule, seed, batch_size, world and per-rank RNG states.
Nothing non-finite is ever written: ``save`` refuses a state with a NaN/inf tensor.
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
from common.errors import UserError

FORMAT = "dali-alexnet-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, foreign or from an incompatible run; one line."""


class NonFiniteState(Exception):
    """A tensor about to be checkpointed holds NaN or inf; nothing was written."""


def nonfinite_tensor(tree: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor in ``tree`` (nested dicts/lists) holding a
    NaN or inf, or None if all are finite. One device->host read per tensor."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
        return (prefix or "tensor") if bad else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        name = nonfinite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if name:
            return name
    return None


def finite_or_error(state: dict[str, Any]) -> NonFiniteState | None:
    """NonFiniteState naming the first NaN/inf tensor of ``state``'s model and optimiser, or None."""
    bad = nonfinite_tensor({"model": state.get("model", {}), "optimizer": state.get("optimizer", {})})
    return NonFiniteState(f"non-finite weights or momentum ({bad} holds NaN/inf)") if bad else None


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise into memory first, then write atomically: no half-written file ever exists.
    The model and optimiser tensors are checked first: a NaN/inf raises NonFiniteState."""
    bad = finite_or_error(state)
    if bad is not None:
        raise bad
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


def load(path: str | Path, keys: tuple[str, ...] = ("model", "config", "epoch", "step")) -> dict[str, Any]:
    """Load a checkpoint written by ``save``, holding at least ``keys``; anything else raises
    CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    state = read_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected format {FORMAT!r})")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return state


def read_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint or weights file, on the CPU; a traced
    export or an unreadable file is a CheckpointError naming it."""
    if kind := _exported_kind(path):
        raise CheckpointError(f"{path}: a {kind} file (tools.export --format ...), which holds a traced net, "
                              "not weights: give a checkpoint, a run folder or a state_dict export")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or foreign file): {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """torch.load's message as one line that ends where a sentence does. Its weights-only
    refusal goes on to suggest weights_only=False, which would run the file's code: not repeated."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text.startswith("Weights only load failed"):
        return "torch's safe (weights-only) load refused it"
    if len(text) <= 200:
        return text
    cut = text.rfind(". ", 0, 200)
    return text[:cut + 1] if cut > 40 else text[:200] + "..."


def _exported_kind(path: Path) -> str | None:
    """"TorchScript" or "torch.export" for those archives (told apart by their members, before
    torch.load would refuse them with a warning and its internals), else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.split("/", 1)[-1] for n in archive.namelist()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):   # torch.load says what is wrong with it
        return None
    if "constants.pkl" in names or any(n.startswith("code/") for n in names):
        return "TorchScript"
    if "archive_format" in names or "models/model.json" in names:
        return "torch.export"
    return None


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states as tensors (CPU generator + every CUDA device's)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> str:
    """Restore what fits this machine: the CPU generator always, CUDA generators for the
    devices both the checkpoint and this machine have. Returns "" or what could not be restored."""
    torch.set_rng_state(state["cpu"])
    saved = list(state.get("cuda", []))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, rng in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(rng, i)
    if len(saved) > visible:
        return f"{len(saved)} CUDA RNG states saved, {visible} GPU(s) visible: restored {visible}"
    return ""
