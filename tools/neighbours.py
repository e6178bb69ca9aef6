"""The paper's Figure 4 for tools.figures: neighbours.png + neighbours.json, a few validation images
each followed by the training images nearest in fc7 features (Euclidean, centre view)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.atomic import write_json
from model.kernels import BACKGROUND
from pipeline import Loader, LoaderOptions, reference
from records.folder import class_names, read_meta, shard_paths
from records.keys import KEYS_FILE, read_keys

from tools import weights
from tools.captions import FiguresError, checkpoint_caption, save_png, text_strip, with_caption
from engine.report import Reporter

# neighbours.png geometry (pixels)
THUMB = 112                  # each 256x256 record image shown at 112x112
THUMB_GAP = 4                # between images and around the grid
QUERY_GAP = 16               # extra space between the query column and its neighbours
FRAME = 4                    # the class frame drawn inside each neighbour's cell
LABEL = 16                   # the text line under each neighbours row (query's class and photo)


@torch.no_grad()
def fc7(net, images: torch.Tensor) -> torch.Tensor:
    """The last hidden layer (fc7, after its ReLU; no dropout in eval mode): float32 (B, 4096)."""
    return torch.cat(net.trace(images)["fc7"], dim=1).float()


def fc7_batches(net, loader: Loader):
    """(features (B, 4096), labels (B,), record keys) for each batch of a with_draws Loader."""
    for images, labels, draws in loader:
        yield fc7(net, images.to(net.input_device)), labels.cpu(), draws.keys


@dataclass
class Neighbours:
    distance: np.ndarray         # (Q, k) float64, ascending per row
    keys: list[list[str]]        # (Q, k) record keys of the train split
    labels: np.ndarray           # (Q, k) class indices


def nearest(queries: torch.Tensor, batches, k: int, limit: int | None = None, on_batch=lambda n: None) -> Neighbours:
    """The k base items nearest to each query row (Euclidean), over an iterable of
    (features, labels, keys) batches, keeping only a running top-k: memory O(queries x k), so
    it scans ImageNet's 1.28M training images without holding their 4096-d features."""
    q = queries.float()
    best_d = torch.full((len(q), 0), math.inf, dtype=torch.float64)
    best_keys: list[list[str]] = [[] for _ in range(len(q))]
    best_labels = torch.zeros((len(q), 0), dtype=torch.int64)
    seen = 0
    for feats, labels, keys in batches:
        if limit is not None and seen >= limit:
            break
        # no matrix-product shortcut: exact differences, so an image's distance to itself is 0
        d = torch.cdist(q.to(feats.device), feats, compute_mode="donot_use_mm_for_euclid_dist")
        d = torch.cat([best_d, d.double().cpu()], dim=1)
        cand_keys = [row + list(keys) for row in best_keys]
        cand_labels = torch.cat([best_labels, labels.view(1, -1).expand(len(q), -1)], dim=1)
        top = d.topk(min(k, d.shape[1]), dim=1, largest=False)   # sorted ascending
        best_d, best_labels = top.values, cand_labels.gather(1, top.indices)
        best_keys = [[row[j] for j in idx] for row, idx in zip(cand_keys, top.indices.tolist())]
        seen += len(keys)
        on_batch(len(keys))
    return Neighbours(best_d.numpy(), best_keys, best_labels.numpy())


def pick(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over 0..total-1 (val records are in class order, so
    this picks queries from across the classes)."""
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(min(count, total))})


def query_features(net, loader: Loader, wanted: list[int]):
    """fc7 features, labels and keys of the val records at positions ``wanted`` (in order)."""
    feats, labels, keys, pos = [], [], [], 0
    want = set(wanted)
    for f, lab, ks in fc7_batches(net, loader):
        for j in range(len(ks)):
            if pos + j in want:
                feats.append(f[j]), labels.append(int(lab[j])), keys.append(ks[j])
        pos += len(ks)
        if pos > max(wanted):
            break
    return torch.stack(feats), labels, keys


def record_images(records: Path, split: str, keys: set[str]) -> dict[str, np.ndarray]:
    """The decoded 256x256 record images of ``keys``, read through the DALI index files
    (byte offsets of each member), so only those JPEGs are read, not whole shards."""
    found: dict[str, np.ndarray] = {}
    for tar, idx in shard_paths(records, split):
        for line in idx.read_text().splitlines()[1:]:
            parts = line.split()
            for ext, offset, size, name in zip(parts[0::4], parts[1::4], parts[2::4], parts[3::4]):
                key = name.rsplit(".", 1)[0]
                if ext == "jpg" and key in keys and key not in found:
                    with open(tar, "rb") as fh:
                        fh.seek(int(offset))
                        found[key] = reference.decode(fh.read(int(size)))
        if len(found) == len(keys):
            break
    return found


def thumbnail(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((THUMB, THUMB), Image.Resampling.BOX))


def neighbours_grid(query_images: list[np.ndarray], rows: list[list[np.ndarray]],
                    same_class: list[list[bool]], labels: list[str] | None = None) -> np.ndarray:
    """uint8 (H, W, 3): one row per query: the query, a gap, its neighbours (framed green when
    of the query's class, red otherwise); with ``labels``, a text line under each row."""
    k = max(len(r) for r in rows)
    width = (1 + k) * THUMB + (k + 2) * THUMB_GAP + QUERY_GAP
    row_h = THUMB + (LABEL if labels else 0)
    height = len(rows) * row_h + (len(rows) + 1) * THUMB_GAP
    grid = np.full((height, width, 3), BACKGROUND, np.uint8)
    for r, (query, row) in enumerate(zip(query_images, rows)):
        y = THUMB_GAP + r * (row_h + THUMB_GAP)
        grid[y:y + THUMB, THUMB_GAP:THUMB_GAP + THUMB] = thumbnail(query)
        if labels:
            grid[y + THUMB:y + row_h] = text_strip(labels[r], width, LABEL)
        for c, (image, same) in enumerate(zip(row, same_class[r])):
            x = 2 * THUMB_GAP + QUERY_GAP + THUMB + c * (THUMB + THUMB_GAP)
            cell = grid[y:y + THUMB, x:x + THUMB]
            cell[:] = (40, 160, 60) if same else (200, 40, 40)
            cell[FRAME:-FRAME, FRAME:-FRAME] = thumbnail(image)[FRAME:-FRAME, FRAME:-FRAME]
    return grid


@dataclass(frozen=True)
class NeighbourOptions:
    queries: int = 5                 # validation images (the paper's Figure 4 shows 5)
    k: int = 6                       # neighbours each (the paper: 6)
    batch_size: int = 64
    train_limit: int | None = None   # scan at most this many training images (None: all)


def neighbours_figure(trained: weights.Trained, out: Path, device: str, opts: NeighbourOptions,
                      say: Reporter) -> dict:
    net, records = trained.net, trained.records
    if records is None:
        raise FiguresError(f"{trained.source}: an exported file names no records folder; "
                           "neighbours.png needs one (--records DIR)")
    mean = "pixel" if trained.mean.ndim == 3 else "channel"
    with_keys = LoaderOptions(with_draws=True)

    def loader(split: str) -> Loader:
        return Loader(records, split=split, view="center", batch_size=opts.batch_size, device=device,
                      mean=mean, options=with_keys)
    val = loader("val")
    wanted = pick(val.epoch_size, opts.queries)
    q, q_labels, q_keys = query_features(net, val, wanted)
    del val
    train = loader("train")
    total = min(train.epoch_size, opts.train_limit or train.epoch_size)
    with say.bar("fc7 features of the train split", total) as advance:
        found = nearest(q, fc7_batches(net, train), opts.k, opts.train_limit, on_batch=advance)
    val_images = record_images(records, "val", set(q_keys))    # keys repeat across splits
    train_images = record_images(records, "train", {k for row in found.keys for k in row})
    same = [[int(lab) == q_labels[i] for lab in found.labels[i]] for i in range(len(q_keys))]
    photo, traced = photo_finder(records, say)
    names = class_names(read_meta(records))
    wnids = trained.classes

    def name(label: int) -> str:
        return names.get(wnids[label], wnids[label])

    labels = [f"{name(lab)} ({wnids[lab]}): {photo('val', key, full=False) or 'record ' + key}"
              for key, lab in zip(q_keys, q_labels)]
    caption = checkpoint_caption(trained)
    grid = neighbours_grid([val_images[k] for k in q_keys],
                           [[train_images[k] for k in row] for row in found.keys], same, labels)
    save_png(with_caption(grid, caption), out / "neighbours.png", caption)
    summary = {"caption": caption, "feature": "fc7 (4096-d, after ReLU), centre 224 crop, Euclidean",
               "train_images_scanned": total,
               "photos": traced,
               "queries": [{"val_key": key, "label": wnids[lab], "name": name(lab), "photo": photo("val", key),
                            "neighbours": [{"train_key": nk, "label": wnids[int(nl)], "name": name(int(nl)),
                                            "photo": photo("train", nk), "distance": float(d)}
                                           for nk, nl, d in zip(found.keys[i], found.labels[i], found.distance[i])]}
                           for i, (key, lab) in enumerate(zip(q_keys, q_labels))]}
    write_json(out / "neighbours.json", summary)
    return summary


def photo_finder(records: Path, say: Reporter):
    """(photo(split, key, full) -> the source photo of a record or None, a sentence for
    neighbours.json): from the records' keys.tsv, the path joined to the build's source
    folder. Records built before keys.tsv: every photo None, and one line says so."""
    tables = {split: read_keys(records, split) for split in ("train", "val")}
    missing = [split for split, table in tables.items() if not table]
    source = read_meta(records).get("source")
    root = Path(source) if isinstance(source, str) else None
    if missing:
        files = ", ".join(str(records / split / KEYS_FILE) for split in missing)
        say.line(f"figures: {files}: missing (records built before it): neighbours name record keys, not photos; "
                 "the build command plus --repair writes it")
        traced = f"not traced: {files} missing (records built before it)"
    else:
        traced = f"the build's source photos ({records}/<split>/{KEYS_FILE})"

    def photo(split: str, key: str, full: bool = True) -> str | None:
        """The photo's path (``full=False``: relative to the source folder, for the picture)."""
        hit = tables[split].get(key)
        if hit is None:
            return None
        return str(root / hit[1]) if root and full else hit[1]
    return photo, traced
