"""Finishing a build: merge the shards' partials, write stats, mean image, skip list, the
eigen-colour picture, then meta.json (the completion marker), and summarise."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from common.atomic import atomic_open, write_json, write_text
from prep import transform
from prep.config import PrepError
from prep.plan import ShardTask, versions
from records.folder import file_crc32
from records.format import FORMAT
from records.keys import KEYS_FILE, tsv_escape
from prep.source import Source
from prep.stats import PixelSums, finalize
from prep.workers import PARTIAL, partial_path

SWATCH = 64                       # stats.png: side of one colour swatch (pixels)
LABEL_W = 176                     # stats.png: width of the label column (pixels)
SWATCH_K = (-3, -2, -1, 0, 1, 2, 3)  # stats.png: mean + k * sqrt(eigval) * eigvec, one swatch per k
HEADER_H = 20                     # stats.png: height of the row naming the k values
STATS_PNG_SIZE = (LABEL_W + SWATCH * len(SWATCH_K), HEADER_H + 3 * SWATCH)  # (width, height)


def collect(out: Path, tasks: list[ShardTask], src: Source) -> dict:
    """Merge every shard's partial: counts, shard lists, skips, exact sums, mean-image sum."""
    sums, skipped = PixelSums(), list(src.skipped)
    counts, shards, crc32 = {"train": 0, "val": 0}, {"train": [], "val": []}, {}
    mean_sum = np.zeros((transform.SIZE, transform.SIZE, 3), np.int64)
    for task in tasks:
        part = json.loads(partial_path(out, task.split, task.name, "json").read_text())
        counts[task.split] += part["records"]
        skipped += [{"split": task.split, **s} for s in part["skipped"]]
        if part["tar"]:
            shards[task.split].append(part["tar"])
            idx = part["tar"][:-len(".tar")] + ".idx"
            # a shard finished by an older build (resumed now) has no checksums in its partial:
            # its published files are final, so read them
            sums_of = part.get("crc32") or {"tar": file_crc32(out / part["tar"]), "idx": file_crc32(out / idx)}
            crc32[part["tar"]], crc32[idx] = sums_of["tar"], sums_of["idx"]
        if task.split == "train":
            sums.merge(PixelSums.from_json(part["sums"]))
            mean_sum += np.load(partial_path(out, task.split, task.name, "npy"))
    skipped.sort(key=lambda s: (s["split"], s["path"]))
    return {"sums": sums, "skipped": skipped, "counts": counts, "shards": shards, "mean_sum": mean_sum,
            "crc32": crc32}


def eigen_colour_image(stats: dict):
    """A PIL picture of the three eigen-colours: row i shows mean + k·√λᵢ·pᵢ (0-255, clipped)
    for each k in SWATCH_K, labelled with λᵢ (0-255² units); what PCA lighting moves along."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", STATS_PNG_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    mean, vals, vecs = np.asarray(stats["mean"]), np.asarray(stats["eigval"]), np.asarray(stats["eigvec"])
    for j, k in enumerate(SWATCH_K):
        draw.text((LABEL_W + j * SWATCH + 4, 4), f"{k:+d} sd" if k else "mean", fill=(0, 0, 0))
    for i in range(3):
        top = HEADER_H + i * SWATCH
        draw.text((4, top + SWATCH // 2 - 12), f"eigen-colour {i + 1}", fill=(0, 0, 0))
        draw.text((4, top + SWATCH // 2 + 2), f"lambda={vals[i]:.1f} sd={np.sqrt(max(vals[i], 0)):.1f}", fill=(0, 0, 0))
        for j, k in enumerate(SWATCH_K):
            rgb = np.clip(np.rint(mean + k * np.sqrt(max(vals[i], 0.0)) * vecs[:, i]), 0, 255).astype(int)
            x = LABEL_W + j * SWATCH
            draw.rectangle((x, top, x + SWATCH - 1, top + SWATCH - 1), fill=tuple(int(v) for v in rgb))
    return img


def write_statistics(out: Path, sums: PixelSums, mean_sum: np.ndarray, count: int) -> dict:
    """stats.json, stats.png and mean_image.npy from the exact sums over ``count`` train images."""
    stats = finalize(sums)
    write_json(out / "stats.json", stats)
    with atomic_open(out / "stats.png", "wb") as fh:
        eigen_colour_image(stats).save(fh, "PNG")
    with atomic_open(out / "mean_image.npy", "wb") as fh:
        np.save(fh, mean_sum / count)  # float64, 0-255 scale
    return stats


def write_keys(out: Path, tasks: list[ShardTask], skipped: list[dict]) -> None:
    """OUT/<split>/keys.tsv: ``key<TAB>shard<TAB>source path`` of every record (the inputs not
    skipped), in key order; the path relative to the source, escaped (records.keys.tsv_escape)."""
    left_out = {(s["split"], s["path"]) for s in skipped}
    for split in ("train", "val"):
        lines = ["key\tshard\tpath\n"]
        for task in (t for t in tasks if t.split == split):
            lines += [f"{key}\t{task.name}\t{tsv_escape(rel)}\n" for rel, _, key in task.items
                      if (split, rel) not in left_out]
        write_text(out / split / KEYS_FILE, "".join(lines))


def names_of(classes: tuple[str, ...], names: dict[str, str]) -> dict[str, str]:
    """meta.json's ``names``: {wnid: name} of the classes the names file knows."""
    return {w: names[w] for w in classes if w in names}


def finish(out: Path, src: Source, identity: dict, got: dict, tasks: list[ShardTask],
           names: dict[str, str]) -> dict:
    """Write stats, stats.png, mean image, skip list, keys.tsv, then meta.json (the completion
    marker); ``names``: {wnid: class name} (names_of)."""
    if got["counts"]["train"] == 0:
        raise PrepError(f"--source {src.root}: no decodable training image")
    stats = write_statistics(out, got["sums"], got["mean_sum"], got["counts"]["train"])
    write_json(out / "skipped.json", got["skipped"])
    write_keys(out, tasks, got["skipped"])
    meta = {"format": FORMAT, "classes": list(src.classes), "names": names, "counts": got["counts"],
            "shards": got["shards"], "crc32": got["crc32"], "source": identity["source"], "params": identity["params"],
            "empty_classes": list(src.empty_classes), "versions": versions(),
            "keys": {split: f"{split}/{KEYS_FILE}" for split in ("train", "val")}}
    write_json(out / "meta.json", meta)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return stats


def summary(out: Path, *, reused: bool, written: int, seconds: float, ffcv: list[str], rate: float = 0.0) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    skipped = json.loads((out / "skipped.json").read_text())
    return {"out": str(out), "source": meta["source"], "classes": len(meta["classes"]),
            "named": len(meta.get("names") or {}),
            "counts": meta["counts"], "shards": {k: len(v) for k, v in meta["shards"].items()},
            "skipped": len(skipped), "skipped_files": skipped, "reused": reused,
            "empty_classes": meta.get("empty_classes", []),
            "images_processed": written, "images_per_s": rate, "seconds": seconds,
            "stats": json.loads((out / "stats.json").read_text()), "ffcv": ffcv}
