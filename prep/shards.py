"""WebDataset shards with their DALI index, written in one pass.

A shard is a plain POSIX (ustar) tar: for each sample ``<key>.jpg`` then ``<key>.cls``.
Every tar header field that could vary between runs (mtime, owner, mode) is fixed, so the same
samples give byte-identical tars. Headers are built here directly (a 512-byte ustar block per
member; names are short keys) rather than with ``tarfile``, whose per-member Python overhead was
~5% of the whole per-image cost; the tests read our tars back with ``tarfile`` and GNU tar.

The index is the file DALI's ``wds2idx`` tool (nvidia-dali 2.4, ``wds2idx.py``) writes and
``fn.readers.webdataset(index_paths=...)`` reads, so the reader starts without scanning tars:

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> <ext> <data offset> <size> <member name> ...

one line per sample, components in tar order, the offset being the byte where the member's
data starts (its 512-byte header's offset + 512). wds2idx recovers those offsets by running
``tar --list --block-num``; we know them while writing. tests/test_prep.py checks that our
index equals wds2idx's byte for byte and that DALI reads every record through it.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

from common.atomic import publish
from common.errors import naming
from records.format import INDEX_VERSION, TAR_BLOCK

TAR_RECORD = 20 * TAR_BLOCK  # archives end padded to a 10240-byte record, as tar and tarfile do


def _header_template() -> tuple[bytes, int]:
    """Every field of our ustar headers except the name and size (left zero), and the byte sum
    of that template with the checksum field counted as spaces (as the checksum is defined)."""
    h = bytearray(TAR_BLOCK)
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"                      # uid
    h[116:124] = b"0000000\0"                      # gid
    h[136:148] = b"00000000000\0"                  # mtime
    h[148:156] = b" " * 8                          # checksum counts as spaces while summing
    h[156:157] = b"0"                              # regular file
    h[257:265] = b"ustar\x0000"                    # POSIX magic + version
    return bytes(h), sum(h)


_TEMPLATE, _TEMPLATE_SUM = _header_template()


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file (mode 644, uid/gid 0, mtime 0). The checksum
    is the template's sum plus the name's and size's bytes: summing all 512 bytes per member
    in Python costs more than the rest of the header."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    size_field = b"%011o\0" % size
    h = bytearray(_TEMPLATE)
    h[0:len(raw)] = raw
    h[124:136] = size_field
    h[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(h)


class ShardWriter:
    """Write one tar shard and its index under temporary names; ``commit`` (or ``close`` then
    ``common.atomic.publish``) renames them in place.

    A reader never sees a half-written shard: until then the files are hidden
    (``.shard-000000.tar.<pid>.tmp``); ``abort`` (or an exception in ``with``) deletes them.
    """

    def __init__(self, tar_path: Path, idx_path: Path):
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        # pid in the temp name: an orphaned worker of a killed run never collides with a rerun
        self._tmp_tar = self.tar_path.with_name(f".{self.tar_path.name}.{os.getpid()}.tmp")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}.{os.getpid()}.tmp")
        self._fh = open(self._tmp_tar, "wb")
        self._offset = 0
        # CRC-32 of every byte written, tar and index (meta.json keeps them: prep.verify and
        # build_records --repair find a shard changed since the build, even where it still decodes)
        self.crc32 = {"tar": 0, "idx": 0}
        self._lines: list[str] = []
        self.count = 0

    def _member(self, name: str, data: bytes) -> str:
        """Write header + data + zero padding; return this member's index entry."""
        pad = -len(data) % TAR_BLOCK
        block = ustar_header(name, len(data)) + data + bytes(pad)
        self._fh.write(block)
        self.crc32["tar"] = zlib.crc32(block, self.crc32["tar"])
        data_at = self._offset + TAR_BLOCK  # the index points at the data, after the header
        self._offset = data_at + len(data) + pad
        ext = name[name.index(".") + 1:]
        return f"{ext} {data_at} {len(data)} {name}"

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        """Append one sample: ``key.jpg`` (JPEG bytes) and ``key.cls`` (ASCII class index)."""
        with naming(self.tar_path):      # a full disk shows here, in write(), naming no file
            parts = [self._member(f"{key}.jpg", jpeg), self._member(f"{key}.cls", str(label).encode())]
        self._lines.append(" ".join(parts))
        self.count += 1

    def close(self) -> list[tuple[Path, Path]]:
        """End the tar (two zero blocks, record padding) and write the index, both under their
        temp names and not yet fsynced: (temp, final) pairs for ``common.atomic.publish``."""
        end = self._offset + 2 * TAR_BLOCK
        tail = bytes(2 * TAR_BLOCK + (-end % TAR_RECORD))
        with naming(self.tar_path):
            self._fh.write(tail)
            self._fh.close()
        self.crc32["tar"] = zlib.crc32(tail, self.crc32["tar"])
        index = (f"{INDEX_VERSION} {self.count}\n" + "".join(line + "\n" for line in self._lines)).encode()
        with naming(self.idx_path), open(self._tmp_idx, "wb") as fh:
            fh.write(index)
        self.crc32["idx"] = zlib.crc32(index)
        return [(self._tmp_tar, self.tar_path), (self._tmp_idx, self.idx_path)]

    def commit(self) -> None:
        """``close``, then fsync both files and rename them into place."""
        publish(self.close())

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        for tmp in (self._tmp_tar, self._tmp_idx):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
