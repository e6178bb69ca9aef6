"""Repairing a finished build (``build_records.py ... --repair``): rebuild exactly the shards
that are missing or whose bytes changed since the build.

The build is deterministic (the same source, parameters and imaging libraries give the same
bytes), and meta.json keeps the CRC-32 of every shard's tar and index. So a damaged shard is
found by its checksum, rebuilt from the source on its own, and accepted only if the rebuilt
files have the checksums of the original build: the statistics, the mean image and every
other shard stay valid. A rebuilt shard that differs (the source files or the JPEG library
changed since the build: meta.json's ``versions``) is removed again and the repair refused:
only a whole new build (--overwrite) is consistent then.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from prep.config import PrepError
from prep.outdir import remove_temp_files
from prep.plan import ShardTask
from records.folder import shard_damage, statistics_problems
from prep.workers import PARTIAL, partial_path, run_tasks


def damaged_shards(out: Path, meta: dict, tasks: list[ShardTask], threads: int,
                   progress: bool) -> list[tuple[ShardTask, str]]:
    """(task, why) of every shard meta.json lists that is missing or changed, in plan order.
    Reading every shard once (zlib's CRC-32 releases the GIL, so threads run in parallel)."""
    listed = set(meta["shards"]["train"] + meta["shards"]["val"])
    todo = [t for t in tasks if f"{t.split}/{t.name}.tar" in listed]
    check = lambda t: shard_damage(out, meta, f"{t.split}/{t.name}.tar")  # noqa: E731
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(check, todo)
        if progress:
            from rich.progress import track
            results = track(results, total=len(todo), description="checking shards", transient=True)
        whys = list(results)
    return [(t, why) for t, why in zip(todo, whys) if why]


def repair(out: Path, tasks: list[ShardTask], workers: int, progress: bool, say) -> int:
    """Rebuild the damaged shards of the finished build in ``out``; returns the images rebuilt.
    ``say(line)`` reports each damaged shard. PrepError if a rebuilt shard differs from the build's."""
    meta = json.loads((out / "meta.json").read_text())
    sums = meta.get("crc32") or {}
    if not sums:
        say(f"{out / 'meta.json'} has no checksums (records built before they were kept): only shards "
            "that are missing or fail the index check are found, and rebuilt unchecked; delete the files "
            "of a shard prep.verify lists to have it rebuilt")
    remove_temp_files(out)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)   # a repair interrupted before
    damaged = damaged_shards(out, meta, tasks, workers, progress)
    for _, why in damaged:
        say(f"damaged: {why}")
    if not damaged:
        return 0
    todo = [task for task, _ in damaged]
    for split in {t.split for t in todo}:
        (out / PARTIAL / split).mkdir(parents=True, exist_ok=True)
    try:
        run_tasks(todo, min(workers, len(todo)), progress)
        differ = []
        for task in todo:
            part = json.loads(partial_path(out, task.split, task.name, "json").read_text())
            tar = f"{task.split}/{task.name}.tar"
            idx = f"{task.split}/{task.name}.idx"
            if sums and (part["tar"] != tar or part["crc32"] != {"tar": sums.get(tar), "idx": sums.get(idx)}):
                differ.append(tar)
                for rel in (tar, idx):
                    (out / rel).unlink(missing_ok=True)
    finally:
        remove_temp_files(out)
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
    for task in todo:
        if f"{task.split}/{task.name}.tar" not in differ:
            say(f"repaired: {out / task.split / task.name}.tar")
    if differ:
        raise PrepError(f"--out {out}: the rebuilt {differ[0]}{f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''} "
                        "differs from the original build, so it was removed again: the source files or the "
                        "imaging libraries changed since (meta.json: versions); rebuild everything with --overwrite")
    return sum(len(t.items) for t in todo)


def repair_statistics(out: Path, tasks: list[ShardTask], workers: int, progress: bool, say) -> bool:
    """Rebuild stats.json, stats.png and mean_image.npy where prep.verify finds them damaged or
    missing: they are integer sums over the train pixels before JPEG encoding (docs/design.md),
    so they are recomputed from the source photos (every train photo decoded and resized again,
    nothing encoded), which gives exactly the original files. Returns True if it rebuilt them.
    PrepError if the source no longer gives the build's train record count."""
    from prep import transform
    from prep.finish import write_statistics
    from prep.stats import PixelSums
    meta = json.loads((out / "meta.json").read_text())
    problems = statistics_problems(out, meta)
    if not problems and (out / "stats.png").is_file():
        return False
    for path, why in problems or [(out / "stats.png", "missing")]:
        say(f"damaged: {path}: {why}")
    todo = [dataclasses.replace(t, stats_only=True) for t in tasks if t.split == "train"]
    (out / PARTIAL / "train").mkdir(parents=True, exist_ok=True)
    try:
        run_tasks(todo, min(workers, len(todo)), progress)
        sums, count = PixelSums(), 0
        mean_sum = np.zeros((transform.SIZE, transform.SIZE, 3), np.int64)
        for task in todo:
            part = json.loads(partial_path(out, task.split, task.name, "json").read_text())
            count += part["records"]
            sums.merge(PixelSums.from_json(part["sums"]))
            mean_sum += np.load(partial_path(out, task.split, task.name, "npy"))
    finally:
        remove_temp_files(out)
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
    if count != meta["counts"]["train"]:
        raise PrepError(f"--out {out}: the source now gives {count} decodable train images, the build had "
                        f"{meta['counts']['train']}: its statistics cannot be recomputed; rebuild everything "
                        "with --overwrite")
    write_statistics(out, sums, mean_sum, count)
    say(f"repaired: {out / 'stats.json'}, {out / 'mean_image.npy'}, {out / 'stats.png'} "
        "(recomputed from the source photos: exactly the build's)")
    return True


def statistics_from_records(out: Path, threads: int, progress: bool, say) -> bool:
    """``--repair`` where the source is gone: stats.json, stats.png and mean_image.npy recomputed
    from the train records' JPEGs (PIL's decoder, threads). Close to the build's but not equal:
    the build summed the pixels before JPEG encoding. Shards cannot be rebuilt without the
    source, so a damaged one is refused (PrepError). Returns True if it rebuilt the statistics."""
    from PIL import Image

    from prep import transform
    from prep.finish import write_statistics
    from records.index import read_index
    from prep.stats import ImageSum, PixelSums
    meta = json.loads((out / "meta.json").read_text())
    damaged = [why for rel in meta["shards"]["train"] + meta["shards"]["val"] if (why := shard_damage(out, meta, rel))]
    if damaged:
        raise PrepError(f"{damaged[0]}{f' (and {len(damaged) - 1} more)' if len(damaged) > 1 else ''}; the source "
                        f"{meta['source']} is gone, so shards cannot be rebuilt: restore it, then --repair")
    problems = statistics_problems(out, meta)
    if not problems and (out / "stats.png").is_file():
        return False
    for path, why in problems or [(out / "stats.png", "missing")]:
        say(f"damaged: {path}: {why}")

    def shard_sums(rel: str) -> tuple[PixelSums, np.ndarray, int]:
        tar = out / rel
        index = read_index(tar, tar.with_suffix(".idx"))
        sums, image = PixelSums(), ImageSum((transform.SIZE, transform.SIZE, 3))
        with open(tar, "rb") as fh:
            for offset, size in index.jpg:
                fh.seek(int(offset))              # the index points at the member's data
                with Image.open(io.BytesIO(fh.read(int(size)))) as im:
                    pixels = np.asarray(im.convert("RGB"))
                sums.add_image(pixels)
                image.add(pixels)
        return sums, image.total(), len(index)

    sums, count = PixelSums(), 0
    mean_sum = np.zeros((transform.SIZE, transform.SIZE, 3), np.int64)
    with ThreadPoolExecutor(threads) as pool:
        for part, image, n in pool.map(shard_sums, meta["shards"]["train"]):
            sums.merge(part)
            mean_sum += image
            count += n
    write_statistics(out, sums, mean_sum, count)
    say(f"repaired: {out / 'stats.json'}, {out / 'mean_image.npy'}, {out / 'stats.png'} (recomputed from the "
        "records' JPEGs, as the source is gone: close to the build's, not equal, since the build summed the "
        "pixels before JPEG encoding)")
    return True
