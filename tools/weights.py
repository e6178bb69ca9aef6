"""A trained AlexNet, ready for inference, from a training checkpoint or an exported weights file.

Shared by the figures, export and predict entry points. A training checkpoint (engine/checkpoint.py)
names its records folder in its config; the class list (meta.json) and the mean the net was trained
with (stats.json's RGB mean, or mean_image.npy with ``--mean pixel``) come from there. An exported
weights file (tools/export.py) carries all three inside, so it needs no records folder.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from model import AlexNet, AlexNetConfig
from records.folder import class_names, read_mean_image, read_meta, read_stats
from records.format import DEFAULT_RECORDS

from engine import checkpoint as ckpt
from common.errors import UserError

WEIGHTS_FORMAT = "dali-alexnet-weights/1"
MODEL_KEYS = tuple(f.name for f in fields(AlexNetConfig) if f.name != "num_classes")


class WeightsError(UserError):
    """A weights file is missing, unreadable or does not fit the model; one line naming it."""


@dataclass
class Trained:
    net: AlexNet                  # in eval mode, on ``device``
    classes: list[str]            # wnids in class-index order (meta.json's)
    names: list[str] | None       # class names in index order (the wnid where meta.json has none)
    mean: np.ndarray              # float32, 0-255 scale: (3,) RGB, or (256, 256, 3) with mean="pixel"
    records: Path | None          # the records folder (an exported file: only if one was given)
    source: Path                  # the file the weights came from
    epoch: int | None = None
    step: int | None = None


def resolve(path: str | Path) -> Path:
    """A run folder means its best.pt (last.pt when no epoch has finished a validation yet)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: run folder has no best.pt or last.pt yet")
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    return path


def read_state(path: Path) -> dict:
    """A training checkpoint or an exported weights file, read with weights_only=True."""
    try:
        state = ckpt.read_file(path)
    except ckpt.CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    if not isinstance(state, dict) or state.get("format") not in (ckpt.FORMAT, WEIGHTS_FORMAT):
        raise WeightsError(f"{path}: not a checkpoint or weights file of this project")
    return state


def model_config(model_state: dict, saved: dict) -> AlexNetConfig:
    """The model's switches from a saved config (train.py flags or an export's ``model``);
    the number of classes from fc8's weight, so it always fits the weights."""
    classes = int(model_state["fc8.weight"].shape[0])
    return AlexNetConfig(num_classes=classes, **{k: saved[k] for k in MODEL_KEYS if k in saved})


def build(model_state: dict, cfg: AlexNetConfig, device: str, path: Path) -> AlexNet:
    net = AlexNet(cfg)
    try:
        net.load_state_dict(model_state)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise WeightsError(f"{path}: its weights do not fit the model ({first})") from None
    try:
        return net.place([device]).eval()
    except ValueError as exc:          # a device that does not exist
        raise WeightsError(f"{path}: cannot place the net: {exc}") from None


def records_folder(saved: dict, records: str | Path | None) -> Path:
    """--records wins; else the folder the run trained on; else the default."""
    if records:
        return Path(records)
    return Path(saved["records"]) if saved.get("records") else DEFAULT_RECORDS


def load(path: str | Path, records: str | Path | None = None, device: str = "cpu") -> Trained:
    """The net of ``path`` (a run folder, checkpoint or exported weights file) in eval mode on
    ``device``, with its classes and mean. Raises WeightsError / RecordsError (one line)."""
    path = resolve(path)
    state = read_state(path)
    if state["format"] == WEIGHTS_FORMAT:
        cfg = model_config(state["model"], state["config"])
        mean = state["mean"].numpy() if isinstance(state["mean"], torch.Tensor) else np.asarray(state["mean"])
        return Trained(net=build(state["model"], cfg, device, path), classes=list(state["classes"]),
                       names=state.get("names"), mean=mean.astype(np.float32),
                       records=Path(records) if records else None, source=path,
                       epoch=state.get("epoch"), step=state.get("step"))
    saved = state["config"]
    folder = records_folder(saved, records)
    meta = read_meta(folder)
    cfg = model_config(state["model"], saved)
    if cfg.num_classes != len(meta["classes"]):
        raise WeightsError(f"{path}: the net has {cfg.num_classes} classes but {folder / 'meta.json'} lists "
                           f"{len(meta['classes'])} (pass the records it was trained on with --records)")
    if saved.get("mean") == "pixel":
        mean = read_mean_image(folder)
    else:
        mean = read_stats(folder).mean
    return Trained(net=build(state["model"], cfg, device, path), classes=list(meta["classes"]),
                   names=[str(n) for n in class_names(meta).values()], mean=np.asarray(mean, np.float32), records=folder, source=path,
                   epoch=state.get("epoch"), step=state.get("step"))


def default_device() -> str:
    """cuda:0 when a GPU is visible, else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"
