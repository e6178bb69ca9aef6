"""Odd source trees and bad output folders: never a traceback, one line, nothing half-written."""
from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest

from prep import outdir
from prep.build_records import build, main
from prep.sample import make_sample_set, wnid
from tests.test_prep import _flat_val, all_records, cfg


def _run(argv, capsys) -> tuple[int, str]:
    code = main([*argv, "--no-progress"])
    return code, capsys.readouterr().err


def _named_path(err: str, out: Path) -> Path:
    """The file an error line names: the path under OUT that ends at the next ': '."""
    start = err.index(str(out))
    return Path(err[start:err.index(": ", start)])


@pytest.fixture()
def tiny(tmp_path) -> Path:
    src = tmp_path / "src"
    make_sample_set(src, classes=3, train_per_class=4, val_per_class=1, seed=2, workers=1)
    return src


def test_odd_entries_are_skipped_with_a_reason(tiny, tmp_path, monkeypatch):
    cls = tiny / "train" / wnid(0)
    os.symlink("loop", cls / "loop")                                     # symlink loop (to itself)
    os.symlink(cls / "gone.JPEG", cls / "dangling.JPEG")                 # dangling symlink
    (cls / "folder.JPEG").mkdir()                                        # a folder named like an image
    with open(os.path.join(os.fsencode(cls), b"caf\xe9.JPEG"), "wb") as fh:  # Latin-1 name: not UTF-8
        fh.write((cls / f"{wnid(0)}_0.JPEG").read_bytes())
    (tiny / "train" / "n99999999").mkdir()                               # a class with no images
    unreadable = cls / f"{wnid(0)}_2.JPEG"
    real_read = Path.read_bytes

    def read_bytes(self):  # CI runs as root, where chmod 000 does not stop reading: simulate it
        if self == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    summary = build(cfg(tiny, tmp_path / "out"))
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in summary["skipped_files"]}
    assert "cannot stat" in reasons["loop"] and "symbolic links" in reasons["loop"]
    assert reasons["dangling.JPEG"] == "dangling symlink"
    assert reasons["folder.JPEG"] == "a folder, not an image file"
    assert reasons["caf\ufffd.JPEG"] == "name is not valid UTF-8"
    assert reasons[unreadable.name] == "cannot read: Permission denied"
    assert summary["empty_classes"] == ["n99999999"]
    assert json.loads((tmp_path / "out" / "skipped.json").read_text()) == summary["skipped_files"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["empty_classes"] == ["n99999999"]


def test_out_that_is_a_file_exits_2(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("keep me")
    code, err = _run(["--source", str(tiny), "--out", str(out)], capsys)
    assert code == 2 and err == f"error: --out {out}: is a file, not a folder\n"
    assert out.read_text() == "keep me"


def test_read_only_out_exits_2_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    real_open = os.open

    def ro_open(path, *a, **kw):  # a read-only file system (chmod cannot simulate it as root)
        if str(path).endswith(outdir.LOCK):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", ro_open)   # the lock is opened by common.atomic
    out = tmp_path / "new" / "out"
    code, err = _run(["--source", str(tiny), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "read-only file system" in err and str(out) in err
    assert not (tmp_path / "new").exists()


def test_second_build_into_the_same_out_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / outdir.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running build holds (flock conflicts across open files)
    try:
        code, err = _run(["--source", str(tiny), "--out", str(out)], capsys)
    finally:
        os.close(fd)
    assert code == 2 and err.count("\n") == 1 and "another build is writing into it" in err
    assert sorted(p.name for p in out.iterdir()) == [outdir.LOCK]
    assert _run(["--source", str(tiny), "--out", str(out)], capsys)[0] == 0  # lock released: builds


def test_stale_leftovers_of_a_killed_build_are_removed(tiny, tmp_path):
    out = tmp_path / "out"

    def stop(split, index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(cfg(tiny, out, shard_size=2), on_shard=stop)
    stale = [out / ".meta.json.abc123.tmp", out / "train" / ".shard-000001.tar.999.tmp",
             out / ".partial" / "train" / ".shard-000001.json.x.tmp",
             out / ".partial" / "train" / "shard-000077.json"]          # not in this build's plan
    for p in stale:
        p.write_text("{}")
    (out / ".partial" / "train" / "shard-000000.npy").unlink()         # done marker without its sums
    build(cfg(tiny, out, shard_size=2))
    assert not any(p.exists() for p in stale) and not (out / ".partial").exists()
    clean = tmp_path / "clean"
    build(cfg(tiny, clean, shard_size=2))
    assert all_records(out, "train") == all_records(clean, "train")
    assert (out / "stats.json").read_bytes() == (clean / "stats.json").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_while_publishing_a_shard_exits_2_and_resumes(tiny, tmp_path, capsys, monkeypatch, workers):
    """The disk fills while a finished shard's files are flushed (fsync: where a full disk
    shows on write-back file systems): one line naming the file, exit 2, no temp files and no
    shard without its done mark; the same command then finishes and equals a clean build."""
    from common import atomic
    out, calls = tmp_path / "out", []
    real_fsync = os.fsync

    def full_fsync(fd):
        calls.append(fd)
        if len(calls) == 9:        # identity.json, then per shard 4 files + 2 folders: shard 2's idx
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", full_fsync)
    args = ["--source", str(tiny), "--out", str(out), "--shard-size", "2", "--workers", str(workers),
            "--no-progress"]
    code, err = _run(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "no space left on device" in err.lower()
    # names the file: with 2 workers shards finish in any order, so it may be a val shard's
    named = _named_path(err, out)
    assert named.parent in {out / "train", out / "val", out / ".partial" / "train", out / ".partial" / "val"}
    assert named.name.startswith("shard-0000")
    assert not list(out.rglob(".*.tmp"))
    for split in ("train", "val"):                      # every shard in place is a finished one
        for tar in (out / split).glob("*.tar"):
            assert (out / ".partial" / split / f"{tar.stem}.json").is_file()
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert _run(args, capsys)[0] == 0
    clean = tmp_path / "clean"
    build(cfg(tiny, clean, shard_size=2))
    assert all_records(out, "train") == all_records(clean, "train")
    assert (out / "stats.json").read_bytes() == (clean / "stats.json").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_while_writing_a_shard_names_it(tiny, tmp_path, capsys, monkeypatch, workers):
    """A full disk in a worker's write() (where ext4 and xfs report it), which names no file:
    one line naming the shard, exit 2, no temp files left."""
    from prep.shards import ShardWriter
    out, real_member, calls = tmp_path / "out", ShardWriter._member, []

    def full_member(self, name, data):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_member(self, name, data)

    monkeypatch.setattr(ShardWriter, "_member", full_member)
    code, err = _run(["--source", str(tiny), "--out", str(out), "--shard-size", "2",
                      "--workers", str(workers)], capsys)
    assert code == 2 and err.count("\n") == 1 and "no space left on device" in err.lower()
    named = _named_path(err, out)                       # a train or val shard: workers race
    assert named.parent in {out / "train", out / "val"} and named.name.startswith("shard-0000")
    assert named.suffix == ".tar"
    assert not list(out.rglob(".*.tmp"))


def _die_on_the_fiftieth(job, classes, seed):
    if job[0].name.endswith("_49.JPEG"):
        os._exit(9)


def test_a_dead_sample_worker_is_an_error_not_a_hang(tmp_path, monkeypatch, capsys):
    """A worker drawing the sample set dies (as under the out-of-memory killer): one line,
    exit 2, instead of a pool waiting forever for the lost chunk."""
    import prep.sample as sample
    monkeypatch.setattr(sample, "_write_one", _die_on_the_fiftieth)
    monkeypatch.setattr(sample, "usable_cores", lambda: 2)   # a pool even on a 1-core runner
    code = sample.main([str(tmp_path / "s"), "--classes", "3", "--train-per-class", "80"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "a worker drawing the sample set died" in err


@pytest.mark.parametrize("fmt", ["kaggle_csv", "text"])
def test_val_labels_with_byte_order_mark_and_windows_line_ends(tiny, tmp_path, fmt):
    labels = _flat_val(tiny)
    lab = tmp_path / "labels"
    if fmt == "kaggle_csv":
        text = "ImageId,PredictionString\r\n" + "".join(f"{s},{w} 1 2 3 4\r\n" for s, w in labels.items())
    else:
        text = "".join(f"{s}.JPEG {w}\r\n" for s, w in labels.items())
    lab.write_bytes(b"\xef\xbb\xbf" + text.encode())
    summary = build(cfg(tiny, tmp_path / "out", val_labels=str(lab)))
    assert summary["counts"]["val"] == len(labels) == 3


def test_stats_png_shows_the_eigen_colours(tiny, tmp_path):
    from PIL import Image

    from prep.finish import STATS_PNG_SIZE
    build(cfg(tiny, tmp_path / "out"))
    with Image.open(tmp_path / "out" / "stats.png") as img:
        assert img.format == "PNG" and img.size == STATS_PNG_SIZE == (176 + 7 * 64, 20 + 3 * 64)
        # the k=0 column is the mean colour in every row
        mean = json.loads((tmp_path / "out" / "stats.json").read_text())["mean"]
        px = img.convert("RGB").getpixel((176 + 3 * 64 + 32, 20 + 32))
        assert all(abs(a - round(b)) <= 1 for a, b in zip(px, mean))


def test_records_of_another_resize_filter_are_refused(tiny, tmp_path):
    from prep.build_records import PrepError
    out = tmp_path / "out"
    build(cfg(tiny, out))
    meta = json.loads((out / "meta.json").read_text())
    meta["params"]["resample"] = "pillow-box-area"  # what an OUT of the earlier filter records
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PrepError, match="resample: 'pillow-box-area' -> 'cv2-area-shrink"):
        build(cfg(tiny, out))
    build(cfg(tiny, out, overwrite=True))
    assert read_meta_params(out)["resample"] == "cv2-area-shrink+cubic-enlarge"


def read_meta_params(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())["params"]


def test_prep_bench_survives_a_flat_val_and_runs_on_photos(tiny, capsys):
    from bench import prep as prep_bench
    _flat_val(tiny)
    assert prep_bench.main(["--source", str(tiny), "--no-ffcv", "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert "train/ only" in out.err and "ours (build_records)" in out.out
    pytest.importorskip("skimage")
    assert prep_bench.main(["--photos", "6", "--no-ffcv", "--workers", "1"]) == 0
    assert "6 images" in capsys.readouterr().out
