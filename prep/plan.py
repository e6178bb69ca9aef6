"""Planning a build: the seeded order of the inputs, the shard tasks, and the build's identity."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.system import versions as system_versions
from prep import transform
from prep.config import DEFAULT_SHARD, MIN_SHARDS, PrepConfig
from prep.source import Item, Source


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: write OUT/<split>/shard-<index>.tar from ``items`` (rel, label, key)."""
    split: str
    index: int
    items: tuple[tuple[str, int, str], ...]
    root: str
    out: str
    quality: int
    stats_only: bool = False   # decode and sum the pixels only, write no shard (--repair of the statistics)

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
            "jpeg_draft_min_factor": transform.DRAFT_FACTOR, "source_digest": src.digest(),
            # only where set: records built before the flag existed keep their identity
            **({"val_fraction": cfg.val_fraction} if cfg.val_fraction else {})}


def versions() -> dict:
    """What built the records (meta.json): the imaging libraries and libjpeg's version."""
    from PIL import features
    return {**system_versions(("numpy", "pillow", "opencv-python*", "nvidia-dali*", "ffcv")),
            "libjpeg": features.version("jpg")}
