"""Readers for the records folder that prep/build_records.py writes (the records contract).

    from prep.records import read_meta, read_stats, shard_paths, DEFAULT_RECORDS
    stats = read_stats(DEFAULT_RECORDS)          # Stats: mean/std in 0-255 levels, cov/eigval in 0-255² (variance units), eigvec
    tars_idxs = shard_paths(DEFAULT_RECORDS, "train")

Layout of OUT:
    meta.json, stats.json, skipped.json, mean_image.npy (float64 256x256x3, 0-255)
    train/shard-000000.tar + .idx, ...   val/shard-000000.tar + .idx, ...
    train.beton, val.beton               (only with --ffcv)
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from prep.shards import INDEX_VERSION, TAR_BLOCK

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECORDS = REPO_ROOT / "data" / "records"
DEFAULT_SAMPLE = REPO_ROOT / "data" / "sample"
FORMAT = "dali-alexnet-records/1"
SPLITS = ("train", "val")


class RecordsError(UserError):
    """The records folder is missing or malformed; the message is one line naming the file."""


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


def parse_label(raw: bytes) -> int:
    """A ``.cls`` component: ASCII decimal digits, optionally followed by whitespace
    (WebDataset writers often end it with a newline). Anything else is a ValueError.
    The one definition: the Loader and prep.verify both read labels with it."""
    text = raw.rstrip(b" \t\r\n")
    if not (0 < len(text) <= 18 and text.isdigit()):    # bytes.isdigit: ASCII 0-9 only
        raise ValueError(f"not a decimal class index: {raw[:20]!r}")
    return int(text)


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}     # start-of-frame markers (any coding)
_SEGMENTS = _SOF | {0xC4, 0xCC, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0))  # DHT DAC DQT DRI COM APPn


def jpeg_structure_error(data) -> str | None:
    """What is wrong with the structure of a record's JPEG (``data``: bytes or a uint8 array),
    or None: start- and end-of-image markers, then every marker segment up to the scan — a
    known marker, a length inside the file, quantisation tables without zeros, Huffman tables
    whose code counts fit, one frame header (8-bit, 1 or 3 components, non-zero size) — before
    the scan. It reads the header (~600 bytes in a record) and decodes nothing: a damaged scan
    (the entropy-coded data) passes, which only a decode finds (prep.verify). The Loader runs
    it on every record before DALI sees it: DALI's CPU decoder can crash the whole process
    (SIGSEGV in one of its threads) on a damaged header."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "no start-of-image marker: its first bytes are damaged"
    if data[n - 2] != 0xFF or data[n - 1] != 0xD9:
        return "no end-of-image marker: it is cut short or its last bytes are damaged"
    head = bytes(data[:4096])                   # Python bytes: far cheaper to index than an array
    pos, frame, tables = 2, False, False
    while True:
        if pos + 4 > n - 2:
            return f"header damaged at byte {pos}: a marker was expected"
        if pos + 4 > len(head):                 # fill bytes ran past the first read
            head = bytes(data[:pos + 4096])
        if head[pos] != 0xFF:
            return f"header damaged at byte {pos}: a marker was expected"
        if head[pos + 1] == 0xFF:                # a fill byte before the marker (the standard allows any)
            pos += 1
            continue
        marker, length = head[pos + 1], (head[pos + 2] << 8) | head[pos + 3]
        end = pos + 2 + length
        if length < 2 or end >= n - 2:
            return f"header damaged: a segment at byte {pos} of length {length} runs past the data"
        if end + 4 > len(head):                 # a header longer than the first read (big APPn)
            head = bytes(data[:end + 4096])
        if marker == 0xDA:
            if not (frame and tables) or length < 8:
                return f"header damaged: a bad scan header at byte {pos}"
            return None
        if marker not in _SEGMENTS:
            return f"header damaged: invalid marker 0x{marker:02X} at byte {pos}"
        body = head[pos + 4:end]
        if marker in _SOF:
            comps = body[5] if len(body) >= 6 else 0
            if (frame or len(body) != 6 + 3 * comps or body[0] != 8 or comps not in (1, 3)
                    or not ((body[1] << 8) | body[2]) or not ((body[3] << 8) | body[4])):
                return f"header damaged: a bad frame header at byte {pos}"
            frame = True
        elif marker == 0xDB:                    # DQT: (precision|id, 64 or 128 bytes) ...
            i = 0
            while i < len(body):
                size = 128 if body[i] >> 4 else 64
                table = body[i + 1:i + 1 + size]
                if body[i] & 0xEC or len(table) != size or (size == 64 and 0 in table):
                    return f"header damaged: a bad quantisation table at byte {pos}"
                i += 1 + size
            tables = True
        elif marker == 0xC4:                    # DHT: (class|id, 16 counts, symbols) ...
            i = 0
            while i < len(body):
                counts = sum(body[i + 1:i + 17])
                if body[i] & 0xEC or i + 17 > len(body) or i + 17 + counts > len(body):
                    return f"header damaged: a bad Huffman table at byte {pos}"
                i += 17 + counts
        pos = end


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


# ----------------------------------------------------------------------------- shard index

@dataclass(frozen=True)
class ShardIndex:
    """One shard's records as its ``.idx`` lists them, checked against its tar.

    Offsets point at a member's data (its 512-byte tar header starts 512 bytes before);
    sizes are in bytes. Record i is ``keys[i]``: ``<key>.jpg`` at ``jpg[i]``, ``<key>.cls``
    at ``cls[i]`` (each row: offset, size)."""
    tar: Path
    idx: Path
    tar_size: int
    keys: np.ndarray    # bytes ('S'), file order
    jpg: np.ndarray     # (n, 2) int64: data offset, size
    cls: np.ndarray     # (n, 2) int64

    def __len__(self) -> int:
        return len(self.keys)


def read_index(tar: str | Path, idx: str | Path, headers: int = 3) -> ShardIndex:
    """Parse ``idx`` (prep/shards.py's format) and check it against ``tar`` cheaply: offsets and
    sizes inside the tar, in increasing order without overlap, on 512-byte blocks, and the
    tar headers of ``headers`` records spread over the shard naming the member with its size.
    RecordsError (one line naming the file) for an empty, truncated or foreign tar or index."""
    tar, idx = Path(tar), Path(idx)
    try:
        tar_size = tar.stat().st_size
        text = idx.read_bytes()
    except OSError as exc:
        raise RecordsError(f"{exc.filename}: unreadable ({exc.strerror})") from None
    keys, jpg, cls = _parse_index(idx, text)
    if tar_size == 0:
        raise RecordsError(f"{tar}: empty file (0 bytes); repair it: the build command plus --repair")
    if tar_size % TAR_BLOCK:
        raise RecordsError(f"{tar}: {tar_size} bytes is not a whole number of 512-byte tar "
                           "blocks (truncated?); repair it: the build command plus --repair")
    _check_layout(tar, idx, tar_size, jpg, cls)
    _check_headers(tar, keys, jpg, cls, headers)
    return ShardIndex(tar, idx, tar_size, keys, jpg, cls)


def _parse_index(idx: Path, text: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """keys, jpg (n, 2), cls (n, 2) from an index's bytes; every line ``jpg OFF SIZE NAME cls
    OFF SIZE NAME`` (other components are allowed and ignored)."""
    lines = text.split(b"\n")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION.encode() or not head[1].isdigit():
        raise RecordsError(f"{idx}: not a DALI index (the first line must be "
                           f"'{INDEX_VERSION} <records>')")
    fast = _parse_plain_index(text, int(head[1]))
    if fast is not None:
        return fast
    rows = [line for line in lines[1:] if line.strip()]
    if len(rows) != int(head[1]):
        raise RecordsError(f"{idx}: the first line says {int(head[1])} records but "
                           f"{len(rows)} follow")
    keys, numbers = [], np.empty((len(rows), 4), np.int64)
    for i, row in enumerate(rows):
        parts = row.split()
        found = {}
        try:
            for j in range(0, len(parts) - 3, 4):
                ext, offset, size, name = parts[j:j + 4]
                found[ext] = (int(offset), int(size), name)
            if len(parts) % 4:
                raise ValueError
            (jo, js, jname), (co, cs, _) = found[b"jpg"], found[b"cls"]
        except (KeyError, ValueError):
            raise RecordsError(f"{idx}: line {i + 2} is not 'jpg OFFSET SIZE NAME cls OFFSET "
                               "SIZE NAME'") from None
        keys.append(jname.rsplit(b".", 1)[0])
        numbers[i] = (jo, js, co, cs)
    if not rows:
        raise RecordsError(f"{idx}: lists no records")
    return np.array(keys), numbers[:, :2], numbers[:, 2:]


def _parse_plain_index(text: bytes, count: int):
    """The common case in one vectorised pass (ImageNet: ~1.3M lines): every line exactly
    ``jpg OFF SIZE KEY.jpg cls OFF SIZE KEY.cls`` as prep/shards.py writes it. None if the
    index is anything else (the line-by-line parser then names the bad line)."""
    tokens = text.split()
    if count < 1 or len(tokens) != 2 + 8 * count:
        return None
    table = np.array(tokens[2:], dtype=object).reshape(count, 8)
    if not ((table[:, 0] == b"jpg").all() and (table[:, 4] == b"cls").all()):
        return None
    try:
        numbers = table[:, [1, 2, 5, 6]].astype(np.bytes_).astype(np.int64)
    except ValueError:
        return None
    keys = np.array([name[:-4] for name in table[:, 3]])
    if not all(name.endswith(b".jpg") for name in table[:, 3]):
        return None
    return keys, numbers[:, :2], numbers[:, 2:]


def _check_layout(tar: Path, idx: Path, tar_size: int, jpg: np.ndarray, cls: np.ndarray) -> None:
    """Every member inside the tar (header and data), on a block boundary, in file order."""
    parts = np.concatenate([jpg, cls])
    starts = parts[:, 0] - TAR_BLOCK            # the member's header
    ends = parts[:, 0] + parts[:, 1]
    if (starts < 0).any() or (parts[:, 1] < 0).any() or (parts[:, 0] % TAR_BLOCK).any():
        raise RecordsError(f"{idx}: offsets not on 512-byte tar blocks; rebuild the index of {tar.name}")
    if ends.max() > tar_size:
        raise RecordsError(f"{tar}: {tar_size} bytes, but {idx.name} lists data up to byte "
                           f"{int(ends.max())} (truncated tar?); repair it: the build command plus --repair")
    order = np.argsort(starts, kind="stable")
    if (starts[order][1:] < ends[order][:-1]).any():
        raise RecordsError(f"{idx}: members overlap; the index does not belong to {tar.name}")


def _check_headers(tar: Path, keys: np.ndarray, jpg: np.ndarray, cls: np.ndarray, count: int) -> None:
    """The ustar headers of ``count`` records (first, last, evenly between) are sane: a valid
    header checksum, the member name ``<key>.<ext>`` and the index's size."""
    picks = np.unique(np.linspace(0, len(keys) - 1, max(1, count)).round().astype(int))
    with open(tar, "rb") as fh:
        for i in picks:
            for ext, (offset, size) in ((b"jpg", jpg[i]), (b"cls", cls[i])):
                fh.seek(int(offset) - TAR_BLOCK)
                header = fh.read(TAR_BLOCK)
                name = keys[i] + b"." + ext
                if not _header_ok(header, name, int(size)):
                    raise RecordsError(f"{tar}: no tar header for {name.decode(errors='replace')} "
                                       "where the index puts it (index and tar do not match); "
                                       "repair it: the build command plus --repair")


def _header_ok(header: bytes, name: bytes, size: int) -> bool:
    if len(header) != TAR_BLOCK:
        return False
    try:
        stored = int(header[148:156].strip(b" \0") or b"-1", 8)
        member_size = int(header[124:136].strip(b" \0") or b"-1", 8)
    except ValueError:
        return False
    checksum = sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
    return stored == checksum and member_size == size and header[:100].rstrip(b"\0") == name
