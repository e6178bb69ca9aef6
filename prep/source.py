"""Find the images of an ImageNet-style source folder and their class indices.

Layouts:
- ``SOURCE/train/<wnid>/*`` (required) and ``SOURCE/val/<wnid>/*`` (class folders), or
- ``SOURCE/val/*`` flat, with ``--val-labels`` = Kaggle's ``LOC_val_solution.csv``
  (``ImageId,PredictionString``; the first token of PredictionString is the wnid) or a text
  file of ``filename wnid`` lines (filename with or without extension).

Class index = position of the wnid in the sorted list of train class folders (torchvision's
ImageFolder convention). Every non-hidden regular file is an input, whatever its extension: the
decoder decides what is an image, and what is not ends up in skipped.json.

Odd entries are never fatal: a name that is not UTF-8, a dangling symlink or symlink loop, a
folder where an image is expected, a class folder that cannot be listed are left out with a
reason (``Source.skipped``, merged into skipped.json), and class folders without a single file
are reported (``Source.empty_classes``): on ImageNet that is almost always a copying mistake.
"""
from __future__ import annotations

import csv
import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError


class SourceError(UserError):
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
    skipped: tuple[dict, ...] = ()       # {"split", "path", "reason"} of entries left out while listing
    empty_classes: tuple[str, ...] = ()  # train class folders with no file at all

    def digest(self) -> str:
        """A fingerprint of what will be read: names, sizes, labels (not contents, too slow)."""
        h = hashlib.sha256()
        for split, items in (("train", self.train), ("val", self.val)):
            for it in items:
                h.update(f"{split}\t{it.rel}\t{it.label}\t{it.size}\n".encode())
        return h.hexdigest()


def control_char(text: str) -> str | None:
    """The first control character (newline, tab, escape...: Unicode category Cc) in ``text``, or None."""
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def printable(name: str) -> str:
    """A file name as it can be written to JSON and a terminal (undecodable bytes shown as U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir maps undecodable bytes to lone surrogates
        return False


def _entries(root: Path, rel_folder: str, skipped: list[dict]) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """(regular files, folders) among the non-hidden entries of ``folder``, sorted by name; every
    other entry (non-UTF-8 name, dangling symlink, symlink loop, socket...) goes to ``skipped``."""
    folder, split = root / rel_folder, rel_folder.split("/")[0]
    files, dirs = [], []
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        skipped.append({"split": split, "path": printable(rel_folder), "reason": f"cannot list folder: {exc.strerror}"})
        return [], []
    for e in entries:
        rel = f"{rel_folder}/{printable(e.name)}"
        if not _is_utf8(e.name):
            skipped.append({"split": split, "path": rel, "reason": "name is not valid UTF-8"})
            continue
        try:
            if e.is_dir():
                dirs.append(e)
            elif e.is_file():
                e.stat()
                files.append(e)
            elif e.is_symlink():
                skipped.append({"split": split, "path": rel, "reason": "dangling symlink"})
            else:
                skipped.append({"split": split, "path": rel, "reason": "not a regular file"})
        except OSError as exc:  # ELOOP (symlink loop), EACCES, ...
            skipped.append({"split": split, "path": rel, "reason": f"cannot stat: {exc.strerror}"})
    return files, dirs


def _class_items(root: Path, split: str, index: dict[str, int], skipped: list[dict]) -> list[Item]:
    items = []
    _, dirs = _entries(root, split, skipped)
    for d in dirs:
        name = d.name
        if name not in index:
            raise SourceError(f"{root / split / name}: class {name!r} is not among the train class folders")
        files, subdirs = _entries(root, f"{split}/{name}", skipped)
        for sub in subdirs:
            skipped.append({"split": split, "path": f"{split}/{name}/{sub.name}", "reason": "a folder, not an image file"})
        for e in files:
            items.append(Item(f"{split}/{name}/{e.name}", index[name], e.stat().st_size))
    return items


def read_val_labels(path: Path) -> dict[str, str]:
    """{file stem: wnid} from LOC_val_solution.csv or a ``filename wnid`` text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark
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
            labels[Path(row[0].strip()).stem] = row[1].split()[0]
    else:
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2:
                raise SourceError(f"--val-labels {path}:{n}: expected 'filename wnid', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    return labels


def _flat_val_items(root: Path, labels_path: Path, index: dict[str, int], skipped: list[dict]) -> list[Item]:
    labels = read_val_labels(labels_path)
    items = []
    files, dirs = _entries(root, "val", skipped)
    for d in dirs:
        skipped.append({"split": "val", "path": f"val/{d.name}", "reason": "a folder in a flat val/ (labels come from --val-labels)"})
    for e in files:
        wnid = labels.get(Path(e.name).stem)
        if wnid is None:
            raise SourceError(f"{root / 'val' / e.name}: no label in --val-labels {labels_path}")
        if wnid not in index:
            raise SourceError(f"{root / 'val' / e.name}: unknown class {wnid!r} in --val-labels {labels_path}")
        items.append(Item(f"val/{e.name}", index[wnid], e.stat().st_size))
    return items


def hold_out(train: list[Item], fraction: float) -> tuple[list[Item], list[Item]]:
    """(train, val): per class, round(fraction x its images) held out as val (at most all but
    one). Which ones depends only on each file's path (the smallest SHA-256 of it), so the same
    photos are held out on every build, whatever the seed and whatever else is in the folder."""
    by_class: dict[int, list[Item]] = {}
    for it in train:
        by_class.setdefault(it.label, []).append(it)
    held: set[str] = set()
    for items in by_class.values():
        k = min(int(fraction * len(items) + 0.5), len(items) - 1)
        ranked = sorted(items, key=lambda it: hashlib.sha256(it.rel.encode()).digest())
        held.update(it.rel for it in ranked[:k])
    return [it for it in train if it.rel not in held], [it for it in train if it.rel in held]


def read_class_names(path: Path) -> dict[str, str]:
    """{wnid: name} from ImageNet's LOC_synset_mapping.txt format: ``n01440764 tench, Tinca tinca``
    (the first word is the wnid, the rest of the line the name). SourceError for an unreadable
    file, a line without a name, or a name with a control character."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"--class-names {path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    names = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            raise SourceError(f"--class-names {path}:{n}: expected 'wnid name', got {line!r}")
        if control_char(parts[1]) is not None:
            raise SourceError(f"--class-names {path}:{n}: the name has a control character: {parts[1]!r}")
        names[parts[0]] = parts[1].strip()
    if not names:
        raise SourceError(f"--class-names {path}: empty")
    return names


def scan(root: str | Path, val_labels: str | None = None, val_fraction: float = 0.0) -> Source:
    """List train and val inputs; SourceError for a missing/empty source or bad labels.
    ``val_fraction``: hold out that part of each class of train/ as val (``hold_out``), for a
    source without val/."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"--source {root}: no such folder")
    if not (root / "train").is_dir():
        raise SourceError(f"--source {root}: no train/ folder (expected ImageNet's train/<wnid>/ layout)")
    skipped: list[dict] = []
    classes = [d.name for d in _entries(root, "train", skipped)[1]]
    if not classes:
        raise SourceError(f"{root / 'train'}: no class folders")
    for name in classes:   # a class name is printed on one line everywhere (predict, logs): refused, not escaped
        if (c := control_char(name)) is not None:
            raise SourceError(f"{root / 'train'}: class folder {name!r} has a control character ({c!r}) in its "
                              "name; rename the folder")
    index = {w: i for i, w in enumerate(classes)}
    train = _class_items(root, "train", index, skipped)
    if not train:
        raise SourceError(f"{root / 'train'}: no files in the class folders")
    val: list[Item] = []
    if val_labels is not None:
        if not (root / "val").is_dir():
            raise SourceError(f"--val-labels given but {root / 'val'} is not a folder")
        val = _flat_val_items(root, Path(val_labels), index, skipped)
    elif (root / "val").is_dir():
        val = _class_items(root, "val", index, skipped)
        if not val and _entries(root, "val", [])[0]:
            raise SourceError(f"{root / 'val'}: flat layout (no class folders): pass --val-labels")
    if val_fraction:
        if (root / "val").exists():
            raise SourceError(f"--val-fraction: {root / 'val'} exists; the held-out part is for a source "
                              "without val/ (remove the flag, or the folder)")
        train, val = hold_out(train, val_fraction)
    present = {it.label for it in train}
    empty = tuple(w for i, w in enumerate(classes) if i not in present)
    return Source(root, tuple(classes), tuple(train), tuple(sorted(val, key=lambda it: it.rel)),
                  tuple(sorted(skipped, key=lambda s: (s["split"], s["path"]))), empty)
