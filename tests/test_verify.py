"""python -m prep.verify: every record decoded, each bad one named by shard and key."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from prep import verify
from records.folder import file_crc32, read_meta, shard_paths
from records.format import INDEX_VERSION
from records.index import read_index
from records.jpeg import StrictJpeg, jpeg_error


@pytest.fixture()
def rec(sample_records, tmp_path) -> Path:
    return Path(shutil.copytree(sample_records, tmp_path / "rec"))


def _jpeg_member(tar: Path, n: int) -> tuple[str, int, int]:
    """(key, data offset, size) of the n-th JPEG in ``tar``."""
    with tarfile.open(tar) as tf:
        member = [m for m in tf if m.name.endswith(".jpg")][n]
        return member.name[:-4], member.offset_data, member.size


def _overwrite(tar: Path, offset: int, data: bytes) -> None:
    with open(tar, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _run(rec: Path, capsys) -> tuple[int, list[str]]:
    status = verify.main([str(rec), "--workers", "1", "--no-progress"])
    return status, capsys.readouterr().out.splitlines()


def test_clean_records_pass(rec, capsys):
    status, lines = _run(rec, capsys)
    assert status == 0 and len(lines) == 1                   # --no-progress: the summary only
    assert "68 records in 6 shards: 0 bad records, 0 bad shards" in lines[-1] and "checksums of 6 shards" in lines[-1]


def test_bad_records_are_named(rec, capsys):
    """A JPEG whose header is destroyed and one with overwritten bytes in mid-stream (which
    PIL decodes silently into garbage) are both listed with shard and key; exit status 1."""
    train, val = shard_paths(rec, "train")[1][0], shard_paths(rec, "val")[0][0]
    destroyed, offset, _ = _jpeg_member(train, 3)
    _overwrite(train, offset, bytes(64))
    garbled, offset, size = _jpeg_member(val, 1)
    _overwrite(val, offset + size // 2, np.random.default_rng(0).integers(0, 256, 256, np.uint8).tobytes())
    status, lines = _run(rec, capsys)
    assert status == 1
    assert any(line.startswith(f"{train} {destroyed}: bad JPEG") for line in lines)
    assert not any(" object at 0x" in line for line in lines)     # what is wrong, not PIL's internals
    if StrictJpeg().available:
        assert any(line.startswith(f"{val} {garbled}: bad JPEG") for line in lines), lines
    # both shards also fail their checksums: two shard lines, besides the two records
    assert sum(line.endswith(f"meta.json says {read_meta(rec)['crc32'][p.relative_to(rec).as_posix()]:08x}")
               for line in lines for p in (train, val)) == 2
    assert ("2 bad records, 2 bad shards" if StrictJpeg().available else "2 bad shards") in lines[-2]


def test_index_tar_mismatch_and_bad_label(rec, capsys):
    train = shard_paths(rec, "train")[0]
    shutil.copy(shard_paths(rec, "train")[1][1], train[1])      # another shard's index
    val = shard_paths(rec, "val")[0][0]
    with tarfile.open(val) as tf:
        cls = [m for m in tf if m.name.endswith(".cls")][0]
    _overwrite(val, cls.offset_data, b"x")
    status, lines = _run(rec, capsys)
    assert status == 1
    assert any(line.startswith(f"{train[0]} -: ") for line in lines), lines
    assert any(line.startswith(f"{val} {cls.name[:-4]}: bad .cls") for line in lines)


def test_missing_tar_and_missing_idx_are_bad_shards(rec, capsys):
    """A shard without its .tar and another without its .idx are each one line naming the
    missing file; every other shard is still verified, exit 1, and the repair advice follows."""
    shards = shard_paths(rec, "train") + shard_paths(rec, "val")
    (no_tar, _), (no_idx_tar, no_idx) = shards[0], shards[2]
    lost = len(read_index(*shards[0])) + len(read_index(*shards[2]))
    no_tar.unlink()
    no_idx.unlink()
    status, lines = _run(rec, capsys)
    assert status == 1
    assert lines[:-2] == [f"{no_tar} -: missing {no_tar.name}",
                          f"{no_idx_tar} -: missing {no_idx.name} (its DALI index)"]
    assert f"{68 - lost} records in 6 shards: 0 bad records, 2 bad shards" in lines[-2]
    # the advice is the command to type, and typing it repairs the records
    command = lines[-1].split("resume training: ", 1)[1]
    assert command.startswith("python prep/build_records.py --source ") and command.endswith(" --repair")
    from prep import build_records
    assert build_records.main(command.split()[2:] + ["--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert _run(rec, capsys)[0] == 0


def test_shard_level_reasons_name_the_file_once(rec, capsys):
    """A truncated tar and a garbage index: the reason does not repeat the shard's path, and
    an index's problem names the .idx."""
    (tar, _), (other, idx) = shard_paths(rec, "train")[:2]
    tar.write_bytes(tar.read_bytes()[:-700])
    idx.write_bytes(b"garbage\n")
    sums = read_meta(rec)["crc32"]

    def changed(shard, path):
        rel = path.relative_to(rec).as_posix()
        return (f"{shard} -: changed since the build: CRC-32 of {path.name} is {file_crc32(path):08x}, "
                f"meta.json says {sums[rel]:08x}")

    status, lines = _run(rec, capsys)
    assert status == 1
    assert lines[:-2] == [
        changed(tar, tar),
        f"{tar} -: {tar.stat().st_size} bytes is not a whole number of 512-byte tar blocks (truncated?); "
        "repair it: the build command plus --repair",
        changed(other, idx),
        f"{other} -: {idx.name}: not a DALI index (the first line must be '{INDEX_VERSION} <records>')"]


def test_not_a_records_folder(tmp_path, capsys):
    assert verify.main([str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_structure_check_takes_fill_bytes_and_names_an_erased_header():
    """0xFF fill bytes before a marker are legal JPEG; a header erased to 0xFF (a flash block)
    is a reason, never an exception (verify's workers and the Loader's feed rely on that)."""
    import io
    from PIL import Image
    from records.jpeg import jpeg_structure_error
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 90)).save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    assert jpeg_structure_error(good) is None
    assert jpeg_structure_error(good[:2] + b"\xff" * 3 + good[2:]) is None
    erased = good[:2] + b"\xff" * 6000 + good[-2:]
    assert jpeg_structure_error(erased).startswith("header damaged at byte")
    assert jpeg_error(erased).startswith("bad JPEG (header damaged")
