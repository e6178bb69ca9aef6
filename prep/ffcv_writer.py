"""FFCV's .beton files from the same 256x256 images as the records (``--ffcv``).

The FFCV baseline must see the same pixels as our records: each beton sample is the record
image before JPEG encoding (``transform.decode_record`` of the same source file, same skips,
same order: train shuffled as in the shards, val sorted), written by FFCV's own
``DatasetWriter`` with ``RGBImageField(write_mode="jpg")`` at the same JPEG quality and an
``IntField`` label. FFCV is an optional extra (``pip install .[ffcv]``); it is imported lazily.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from prep import transform


class RecordImages:
    """An indexed dataset for FFCV's writer: (uint8 256x256x3 RGB image, int label)."""

    def __init__(self, root: Path, items: list[tuple[str, int]]):
        self.root, self.items = Path(root), items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, label = self.items[i]
        return transform.decode_record((self.root / rel).read_bytes()), label


def write_beton(path: Path, dataset, quality: int, workers: int) -> None:
    """One .beton via FFCV's DatasetWriter, under a temp name renamed into place when complete."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=quality, max_resolution=transform.SIZE),
              "label": IntField()}
    try:
        DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(dataset)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_betons(out: Path, root: Path, tasks, quality: int, workers: int) -> list[str]:
    """OUT/train.beton and OUT/val.beton (kept if already there: same identity as the records)."""
    skipped = {(s["split"], s["path"]) for s in json.loads((Path(out) / "skipped.json").read_text())}
    written = []
    for split in ("train", "val"):
        items = [(rel, label) for t in tasks if t.split == split for rel, label, _ in t.items
                 if (split, rel) not in skipped]
        path = Path(out) / f"{split}.beton"
        if items and not path.is_file():
            write_beton(path, RecordImages(root, items), quality, workers)
        if path.is_file():
            written.append(str(path))
    return written
