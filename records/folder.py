"""The records folder's files: meta.json, stats.json, the mean image, the shards' paths in
meta.json's order, and their checksums (what prep.repair and prep.verify compare)."""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from records.format import FORMAT, SPLITS, RecordsError
from records.index import read_index


@dataclass(frozen=True)
class Stats:
    """RGB statistics of every training pixel on the 0-255 scale (stats.json): mean and std in
    levels, cov and eigval in levels² (variances; ~5,000 for the top eigenvalue on photos)."""
    pixels: int
    mean: np.ndarray    # (3,) R, G, B
    std: np.ndarray     # (3,)
    cov: np.ndarray     # (3, 3), 0-255² units
    eigval: np.ndarray  # (3,) descending, 0-255² units (variance along eigvec[:, i])
    eigvec: np.ndarray  # (3, 3), column i = unit eigenvector of eigval[i]


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise RecordsError(f"{path}: missing (build records with prep/build_records.py)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordsError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise RecordsError(f"{path}: expected a JSON object")
    return data


def read_meta(out: str | Path) -> dict:
    """meta.json as a dict, checked for the fields readers rely on."""
    path = Path(out) / "meta.json"
    meta = _load_json(path)
    if meta.get("format") != FORMAT:
        raise RecordsError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("classes", "counts", "shards"):
        if key not in meta:
            raise RecordsError(f"{path}: missing field {key!r}")
    for split in SPLITS:
        if split not in meta["counts"] or split not in meta["shards"]:
            raise RecordsError(f"{path}: missing {split!r} in counts/shards")
    return meta


def _array(path: Path, data: dict, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in data:
        raise RecordsError(f"{path}: missing field {key!r}")
    try:
        arr = np.asarray(data[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise RecordsError(f"{path}: field {key!r} is not numeric") from None
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise RecordsError(f"{path}: field {key!r} must be finite with shape {shape}, got {arr.shape}")
    arr.setflags(write=False)
    return arr


def read_stats(out: str | Path) -> Stats:
    """stats.json as Stats; RecordsError naming stats.json and the missing/bad field."""
    path = Path(out) / "stats.json"
    data = _load_json(path)
    pixels = data.get("pixels")
    if not isinstance(pixels, int) or isinstance(pixels, bool) or pixels <= 0:
        raise RecordsError(f"{path}: field 'pixels' must be a positive integer, got {pixels!r}")
    return Stats(pixels=pixels,
                 mean=_array(path, data, "mean", (3,)),
                 std=_array(path, data, "std", (3,)),
                 cov=_array(path, data, "cov", (3, 3)),
                 eigval=_array(path, data, "eigval", (3,)),
                 eigvec=_array(path, data, "eigvec", (3, 3)))


def read_mean_image(out: str | Path) -> np.ndarray:
    """mean_image.npy: float64 (256, 256, 3), 0-255 scale, the per-pixel mean of train images."""
    path = Path(out) / "mean_image.npy"
    if not path.is_file():
        raise RecordsError(f"{path}: missing (build records with prep/build_records.py)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RecordsError(f"{path}: unreadable ({exc})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise RecordsError(f"{path}: expected shape (H, W, 3), got {arr.shape}")
    return arr


def shard_paths(out: str | Path, split: str, missing_ok: bool = False) -> list[tuple[Path, Path]]:
    """[(tar, idx), ...] of ``split`` in meta.json's order; RecordsError if any file is missing,
    unless ``missing_ok`` (prep.verify reports a missing file as a bad shard)."""
    if split not in SPLITS:
        raise RecordsError(f"unknown split {split!r}: expected one of {SPLITS}")
    out = Path(out)
    folder = out / split
    if not folder.is_dir():
        raise RecordsError(f"{folder}: missing records folder")
    meta = read_meta(out)
    pairs = []
    for rel in meta["shards"][split]:
        tar = out / rel
        idx = tar.with_suffix(".idx")
        if not missing_ok and not tar.is_file():
            raise RecordsError(f"{tar}: missing shard listed in {out / 'meta.json'}; repair: the build "
                               "command plus --repair")
        if not missing_ok and not idx.is_file():
            raise RecordsError(f"{idx}: missing DALI index file for {tar.name}; repair: the build command "
                               "plus --repair")
        pairs.append((tar, idx))
    if not pairs:
        raise RecordsError(f"{out / 'meta.json'}: no {split} shards")
    return pairs


def file_crc32(path: str | Path, chunk: int = 1 << 20) -> int:
    """CRC-32 of a file's bytes (zlib's, as the writer computes it while writing)."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def shard_damage(out: str | Path, meta: dict, rel: str) -> str | None:
    """Why shard ``rel`` (``train/shard-000003.tar``) is not what the build wrote: its tar or
    index missing, or its bytes changed since (CRC-32 against meta.json's); None if intact. Where
    meta.json predates the checksums, only the index check against the tar (``read_index``)
    can tell. OSErrors propagate."""
    out = Path(out)
    sums = meta.get("crc32") or {}
    tar, idx = out / rel, (out / rel).with_suffix(".idx")
    for path in (tar, idx):
        name = path.relative_to(out).as_posix()
        if not path.is_file():
            return f"{path}: missing"
        if name in sums and (crc := file_crc32(path)) != sums[name]:
            return (f"{path}: changed since the build (CRC-32 {crc:08x}, meta.json: {sums[name]:08x}; "
                    "damaged on disk or modified)")
    if not sums:          # no checksums to compare (older records): at least the index against its tar
        try:
            read_index(tar, idx)
        except RecordsError as exc:
            return str(exc)
    return None


def class_names(meta: dict) -> dict[str, str]:
    """{wnid: readable name} for every class of meta.json: the name the build stored
    (--class-names, or SOURCE/LOC_synset_mapping.txt), else the wnid itself."""
    names = meta.get("names") or {}
    return {w: names.get(w) or w for w in meta["classes"]}


# ----------------------------------------------------------------------------- the statistics files

def statistics_problems(out: str | Path, meta: dict) -> list[tuple[Path, str]]:
    """What is wrong with the files training reads beside the shards, as (file, what): stats.json
    (every field, shapes, finite, pixels = train records x 256², std = √diag(cov), eigval
    descending and eigvec orthonormal with cov = V·diag(λ)·Vᵀ) and mean_image.npy (256x256x3
    float64, finite, 0-255, its average = stats' mean). Empty if both are good. Both are sums
    over the train records, so ``build_records.py ... --repair`` rebuilds them."""
    out = Path(out)
    problems: list[tuple[Path, str]] = []
    size = int(meta.get("params", {}).get("size", 256))
    stats_path, mean_path = out / "stats.json", out / "mean_image.npy"
    try:
        stats = read_stats(out)
    except RecordsError as exc:
        problems.append((stats_path, _without_path(str(exc), stats_path)))
        stats = None
    if stats is not None:
        vals, vecs, cov = stats.eigval, stats.eigvec, stats.cov
        scale = max(float(np.abs(cov).max()), 1.0)       # 0-255² units: tolerances relative to it
        train = meta["counts"]["train"]
        if isinstance(train, int) and stats.pixels != train * size * size:
            problems.append((stats_path, f"pixels {stats.pixels} is not the {train} train records x {size}x{size}"))
        if not np.all((stats.mean >= 0) & (stats.mean <= 255)):
            problems.append((stats_path, f"mean {stats.mean.tolist()} is outside 0-255"))
        if not np.allclose(cov, cov.T, rtol=0, atol=1e-9 * scale):
            problems.append((stats_path, "cov is not symmetric"))
        if not np.allclose(stats.std, np.sqrt(np.clip(np.diag(cov), 0, None)), rtol=1e-9, atol=1e-9):
            problems.append((stats_path, "std is not the square root of cov's diagonal"))
        if not (vals[0] >= vals[1] >= vals[2] >= -1e-9 * scale):
            problems.append((stats_path, f"eigval {vals.tolist()} is not descending and non-negative"))
        if not np.allclose(vecs.T @ vecs, np.eye(3), rtol=0, atol=1e-9):
            problems.append((stats_path, "eigvec is not orthonormal"))
        elif not np.allclose(vecs @ np.diag(vals) @ vecs.T, cov, rtol=0, atol=1e-9 * scale):
            problems.append((stats_path, "eigval/eigvec are not the eigen-decomposition of cov"))
    if not mean_path.is_file():
        problems.append((mean_path, "missing"))
        return problems
    try:
        image = np.load(mean_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        problems.append((mean_path, f"unreadable ({exc})"))
        return problems
    if image.shape != (size, size, 3) or image.dtype != np.float64:
        problems.append((mean_path, f"expected float64 {(size, size, 3)}, got {image.dtype} {image.shape}"))
    elif not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
        problems.append((mean_path, "values are not finite numbers in 0-255"))
    elif stats is not None and not np.allclose(image.mean(axis=(0, 1)), stats.mean, rtol=0, atol=1e-6):
        problems.append((mean_path, f"its average {image.mean(axis=(0, 1)).round(4).tolist()} is not stats.json's "
                                    f"mean {stats.mean.round(4).tolist()}"))
    return problems


def _without_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message
