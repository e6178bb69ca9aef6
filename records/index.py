"""A shard's DALI index (``.idx``, prep/shards.py's and wds2idx's format) read and checked
against its tar, and a record's ``.cls`` label: the one parser of both."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from records.format import INDEX_VERSION, TAR_BLOCK, RecordsError


def parse_label(raw: bytes) -> int:
    """A ``.cls`` component: ASCII decimal digits, optionally followed by whitespace
    (WebDataset writers often end it with a newline). Anything else is a ValueError.
    The one definition: the Loader and prep.verify both read labels with it."""
    text = raw.rstrip(b" \t\r\n")
    if not (0 < len(text) <= 18 and text.isdigit()):    # bytes.isdigit: ASCII 0-9 only
        raise ValueError(f"not a decimal class index: {raw[:20]!r}")
    return int(text)


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
                if not header_ok(header, name, int(size)):
                    raise RecordsError(f"{tar}: no tar header for {name.decode(errors='replace')} "
                                       "where the index puts it (index and tar do not match); "
                                       "repair it: the build command plus --repair")


def header_ok(header: bytes, name: bytes, size: int) -> bool:
    """Whether ``header`` is a sane ustar header of member ``name`` holding ``size`` bytes: its
    checksum valid, the name and the size as given."""
    if len(header) != TAR_BLOCK:
        return False
    try:
        stored = int(header[148:156].strip(b" \0") or b"-1", 8)
        member_size = int(header[124:136].strip(b" \0") or b"-1", 8)
    except ValueError:
        return False
    checksum = sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
    return stored == checksum and member_size == size and header[:100].rstrip(b"\0") == name
