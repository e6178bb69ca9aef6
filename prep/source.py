"""Find the images of an ImageNet-style source folder and their class indices.

Layouts:
- ``SOURCE/train/<wnid>/*`` (required) and ``SOURCE/val/<wnid>/*`` (class folders), or
- ``SOURCE/val/*`` flat, with ``--val-labels`` = Kaggle's ``LOC_val_solution.csv``
  (``ImageId,PredictionString``; the first token of PredictionString is the wnid) or a text
  file of ``filename wnid`` lines (filename with or without extension).

Class index = position of the wnid in the sorted list of train class folders (torchvision's
ImageFolder convention). Every non-hidden regular file is an input, whatever its extension: the
decoder decides what is an image, and what is not ends up in skipped.json.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


class SourceError(Exception):
    """The source folder or label file is unusable; the message is one line naming it."""


@dataclass(frozen=True)
class Item:
    rel: str     # path relative to SOURCE, '/'-separated
    label: int   # class index
    size: int    # bytes (part of the source fingerprint)


@dataclass(frozen=True)
class Source:
    root: Path
    classes: tuple[str, ...]
    train: tuple[Item, ...]   # sorted by (class, file name)
    val: tuple[Item, ...]     # sorted by relative path

    def digest(self) -> str:
        """A fingerprint of what will be read: names, sizes, labels (not contents, too slow)."""
        h = hashlib.sha256()
        for split, items in (("train", self.train), ("val", self.val)):
            for it in items:
                h.update(f"{split}\t{it.rel}\t{it.label}\t{it.size}\n".encode())
        return h.hexdigest()


def _files(folder: Path) -> list[os.DirEntry]:
    """Non-hidden regular files of ``folder``, sorted by name."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".") and e.is_file()), key=lambda e: e.name)


def _subdirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def _class_items(root: Path, split: str, index: dict[str, int]) -> list[Item]:
    items = []
    for name in _subdirs(root / split):
        if name not in index:
            raise SourceError(f"{root / split / name}: class {name!r} is not among the train class folders")
        for e in _files(root / split / name):
            items.append(Item(f"{split}/{name}/{e.name}", index[name], e.stat().st_size))
    return items


def read_val_labels(path: Path) -> dict[str, str]:
    """{file stem: wnid} from LOC_val_solution.csv or a ``filename wnid`` text file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"--val-labels {path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise SourceError(f"--val-labels {path}: empty")
    labels = {}
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.reader(lines[1:]):
            if len(row) < 2 or not row[1].split():
                raise SourceError(f"--val-labels {path}: bad row {row!r}")
            labels[Path(row[0]).stem] = row[1].split()[0]
    else:
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2:
                raise SourceError(f"--val-labels {path}:{n}: expected 'filename wnid', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    return labels


def _flat_val_items(root: Path, labels_path: Path, index: dict[str, int]) -> list[Item]:
    labels = read_val_labels(labels_path)
    items = []
    for e in _files(root / "val"):
        wnid = labels.get(Path(e.name).stem)
        if wnid is None:
            raise SourceError(f"{root / 'val' / e.name}: no label in --val-labels {labels_path}")
        if wnid not in index:
            raise SourceError(f"{root / 'val' / e.name}: unknown class {wnid!r} in --val-labels {labels_path}")
        items.append(Item(f"val/{e.name}", index[wnid], e.stat().st_size))
    return items


def scan(root: str | Path, val_labels: str | None = None) -> Source:
    """List train and val inputs; SourceError for a missing/empty source or bad labels."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"--source {root}: no such folder")
    if not (root / "train").is_dir():
        raise SourceError(f"--source {root}: no train/ folder (expected ImageNet's train/<wnid>/ layout)")
    classes = _subdirs(root / "train")
    if not classes:
        raise SourceError(f"{root / 'train'}: no class folders")
    index = {w: i for i, w in enumerate(classes)}
    train = _class_items(root, "train", index)
    if not train:
        raise SourceError(f"{root / 'train'}: no files in the class folders")
    val: list[Item] = []
    if val_labels is not None:
        if not (root / "val").is_dir():
            raise SourceError(f"--val-labels given but {root / 'val'} is not a folder")
        val = _flat_val_items(root, Path(val_labels), index)
    elif (root / "val").is_dir():
        val = _class_items(root, "val", index)
        if not val and _files(root / "val"):
            raise SourceError(f"{root / 'val'}: flat layout (no class folders): pass --val-labels")
    return Source(root, tuple(classes), tuple(train), tuple(sorted(val, key=lambda it: it.rel)))
