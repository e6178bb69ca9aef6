"""The records build's typed config and its one error class (shared by the prep modules)."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import UserError

MAX_SHARD = 1_000_000  # mean-image partials are uint32: 255 * MAX_SHARD < 2^32
DEFAULT_SHARD = 1000   # ~25 MB tars for ImageNet: 1282 train shards
MIN_SHARDS = 16        # the automatic shard size keeps at least this many train shards


class PrepError(UserError):
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
    val_fraction: float = field(default=0.0, metadata={
        "help": "for a source without val/: hold out this part of every class of train/ as val records "
                "(e.g. 0.1; the same photos on every build)"})
    class_names: str | None = field(default=None, metadata={
        "help": "class names, ImageNet's LOC_synset_mapping.txt format ('n01440764 tench, Tinca tinca' lines), "
                "stored in meta.json; default: SOURCE/LOC_synset_mapping.txt where it exists"})
    ffcv: bool = field(default=False, metadata={"help": "also write OUT/train.beton and OUT/val.beton (FFCV)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace records in OUT built from another source or with other parameters"})
    repair: bool = field(default=False, metadata={
        "help": "with the arguments of a finished build: check every shard against meta.json's "
                "checksums and rebuild the damaged or missing ones (byte for byte)"})
    seed: int = field(default=0, metadata={"help": "seed of the global train shuffle"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar and summary"})

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size is not None and not 1 <= self.shard_size <= MAX_SHARD:
            raise ValueError(f"--shard-size must be in 1..{MAX_SHARD}, got {self.shard_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")

