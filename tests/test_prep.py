"""The records stage (prep/): what the paper and the records contract say, checked.

Everything here runs on tiny synthetic sources (a few dozen images), so the file stays fast.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from prep import transform, verify
from prep.build_records import PrepConfig, PrepError, build, main
from records.folder import read_mean_image, read_meta, read_stats, shard_paths
from records.format import RecordsError
from prep.sample import make_sample_set, wnid
from prep.source import SourceError
from prep.stats import ImageSum, PixelSums

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers

def _jpeg(arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(buf, fmt, quality=95) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


def _solid(w: int, h: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def _textured(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth random image (JPEG-friendly) so every file is distinct."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def read_tar(path: Path) -> dict[str, tuple[bytes, int]]:
    """{key: (jpeg bytes, label)} of one shard, read with the standard tarfile module."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {k: (v["jpg"], int(v["cls"].decode())) for k, v in out.items()}


def all_records(out: Path, split: str) -> list[tuple[str, bytes, int]]:
    """(key, jpeg, label) in shard order."""
    recs = []
    for tar, _ in shard_paths(out, split):
        recs += [(k, j, c) for k, (j, c) in read_tar(tar).items()]
    return recs


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a records folder (for byte-identity checks); meta's source path dropped."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != ".build.lock"}     # the lock names its last owner (pid, time)
    meta = json.loads(files["meta.json"])
    meta.pop("source")
    files["meta.json"] = json.dumps(meta).encode()
    return files


def cfg(src, out, **kw) -> PrepConfig:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return PrepConfig(source=str(src), out=str(out), **kw)


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> Path:
    """3 classes x 8 train + 3 val, with the sample set's odd files (gray, CMYK, PNG, corrupt)."""
    root = tmp_path_factory.mktemp("small_src")
    make_sample_set(root, classes=3, train_per_class=8, val_per_class=3, seed=1, workers=1)
    return root


@pytest.fixture(scope="module")
def small_records(small_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_rec") / "out"
    build(cfg(small_source, out, shard_size=5))
    return out


# ---------------------------------------------------------------- the resize (the paper's geometry)

def test_resize_keeps_exactly_the_central_square():
    # 300x200: the central 200x200 square is red, the 50-px side bands blue. Shorter side -> 256,
    # central 256x256 crop = exactly the red square.
    arr = _solid(300, 200, (0, 0, 255))
    arr[:, 50:250] = (255, 0, 0)
    out = transform.resize_center(Image.fromarray(arr))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, 2:-2], _solid(252, 256, (255, 0, 0)))
    # the same for portrait: bands on top and bottom
    out = transform.resize_center(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))))
    assert np.array_equal(out[2:-2, :], _solid(256, 252, (255, 0, 0)))


def test_resize_matches_resize_then_crop():
    # Independent route: PIL resize of the whole image (shorter side 256) then a central crop.
    # 600x300 -> 512x256, crop x 128..384: a whole-pixel offset, so both routes are the same map.
    arr = _textured(600, 300, seed=3)
    ours = transform.resize_center(Image.fromarray(arr)).astype(float)
    full = cv2.resize(arr, (512, 256), interpolation=cv2.INTER_AREA)
    ref = full[:, 128:384].astype(float)
    assert np.abs(ours - ref).max() <= 1.0  # rounding only


def test_jpeg_draft_decoding_stays_close_to_full_decoding():
    data = _jpeg(_textured(4096, 3072, seed=4))  # short side 3072 >= 4*256: decoded at 1/4 (768)
    fast = transform.decode_record(data).astype(float)
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # loaded: no draft possible
        slow = transform.resize_center(img).astype(float)
    assert np.abs(fast - slow).mean() < 1.5


# ---------------------------------------------------------------- exact statistics

def test_pixel_sums_are_exact_integers():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), np.full((256, 256, 3), 255, np.uint8),
            rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),   # a size that is no multiple of 256
            np.zeros((256, 256, 3), np.uint8),
            np.stack([np.full((64, 64), 255, np.uint8), np.zeros((64, 64), np.uint8),
                      rng.integers(0, 256, (64, 64), dtype=np.uint8)], axis=-1)]   # extreme pairs
    sums = PixelSums()
    for img in imgs:
        sums.add_image(img)
    x = np.concatenate([i.reshape(-1, 3).astype(object) for i in imgs])  # python ints: no overflow
    assert sums.n == len(x)
    assert sums.s == [int(v) for v in x.sum(axis=0)]
    assert sums.q == [[int((x[:, i] * x[:, j]).sum()) for j in range(3)] for i in range(3)]


def test_image_sum_is_exact_past_the_uint16_flush():
    """600 images (two flushes of the uint16 buffer and a remainder): 300 all-255 in a row
    (a 258th before a flush would wrap uint16) then random ones; the per-pixel total equals
    Python-int sums."""
    rng = np.random.default_rng(1)
    imgs = [np.full((4, 5, 3), 255, np.uint8) if i < 300 else rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
            for i in range(600)]
    total = ImageSum((4, 5, 3))
    for img in imgs:
        total.add(img)
    want = np.sum([img.astype(object) for img in imgs], axis=0)
    got = total.total()
    assert got.dtype == np.uint32 and (got.astype(object) == want).all()


def test_stats_equal_independent_float64_computation(small_source, small_records):
    meta = read_meta(small_records)
    pixels = []
    for path in sorted(p for p in (small_source / "train").rglob("*") if p.is_file()):
        try:
            pixels.append(transform.decode_record(path.read_bytes()))
        except transform.ImageError:
            continue
    x = np.concatenate([p.reshape(-1, 3) for p in pixels]).astype(np.float64)
    st = read_stats(small_records)
    assert len(pixels) == meta["counts"]["train"] and st.pixels == len(x) == len(pixels) * 256 * 256
    np.testing.assert_allclose(st.mean, x.mean(axis=0), rtol=1e-12)
    cov = np.cov(x.T, bias=True)
    np.testing.assert_allclose(st.cov, cov, rtol=1e-9)
    np.testing.assert_allclose(st.std, x.std(axis=0), rtol=1e-9)
    vals = np.linalg.eigvalsh(cov)[::-1]
    np.testing.assert_allclose(st.eigval, vals, rtol=1e-9)
    assert np.all(np.diff(st.eigval) <= 0)
    np.testing.assert_allclose(st.eigvec.T @ st.eigvec, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(cov @ st.eigvec, st.eigvec * st.eigval, rtol=1e-9, atol=1e-9)
    mean_img = read_mean_image(small_records)
    assert mean_img.dtype == np.float64 and mean_img.shape == (256, 256, 3)
    np.testing.assert_allclose(mean_img, np.mean(np.stack(pixels).astype(np.float64), axis=0), rtol=1e-12)


# ---------------------------------------------------------------- the records contract

def test_conftest_sample_records_follow_the_contract(sample_source, sample_records):
    meta = read_meta(sample_records)
    assert meta["format"] == "dali-alexnet-records/1"
    assert meta["classes"] == [wnid(c) for c in range(4)]
    assert meta["counts"] == {"train": 48, "val": 20}  # the one corrupt file is skipped
    skipped = json.loads((sample_records / "skipped.json").read_text())
    assert [s["path"] for s in skipped] == [f"train/{wnid(3)}/{wnid(3)}_12.JPEG"]
    assert "truncated" in skipped[0]["reason"]
    for split in ("train", "val"):
        pairs = shard_paths(sample_records, split)
        assert [t.relative_to(sample_records).as_posix() for t, _ in pairs] == meta["shards"][split]
        assert all(i == t.with_suffix(".idx") for t, i in pairs)
    assert {"numpy", "pillow", "python"} <= set(meta["versions"])
    assert meta["params"]["shard_size"] == 16 and meta["params"]["quality"] == 90


def _source_images(src: Path, split: str) -> dict[str, tuple[np.ndarray, int]]:
    """rel path -> (record pixels, label) computed from the source, labels from folder names."""
    classes = sorted(p.name for p in (src / "train").iterdir())
    out = {}
    for path in sorted((src / split).rglob("*")):
        if path.is_file():
            try:
                out[path.relative_to(src).as_posix()] = (transform.decode_record(path.read_bytes()),
                                                         classes.index(path.parent.name))
            except transform.ImageError:
                continue   # the planted corrupt file: skipped by the build too
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_record_is_its_source_image_with_its_label(sample_source, sample_records, split):
    sources = _source_images(sample_source, split)
    names = list(sources)
    stack = np.stack([sources[n][0] for n in names]).astype(np.int16)
    matched = []
    recs = all_records(sample_records, split)
    for key, jpg, label in recs:
        assert len(key) == 8 and key.isdigit()
        with Image.open(io.BytesIO(jpg)) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (256, 256)
            assert not img.info.get("progressive")
            arr = np.asarray(img).astype(np.int16)
        err = np.abs(stack - arr).mean(axis=(1, 2, 3))
        best = int(np.argmin(err))
        # one clear match: its own JPEG (q90; the sample's fine, sharp-edged textures on saturated
        # colours lose several levels to it, mostly to 4:2:0 chroma), every other image far off
        assert err[best] < 12.0 and np.sort(err)[1] > max(10.0, 4 * err[best])
        assert label == sources[names[best]][1]
        matched.append(names[best])
    assert sorted(matched) == names  # every decodable source exactly once
    assert len({k for k, _, _ in recs}) == len(recs)
    if split == "val":
        assert matched == names  # val: sorted order
    else:
        assert matched != names  # train: shuffled across shards


def test_shards_are_shuffled_globally_with_the_seed(small_source, tmp_path):
    a = build(cfg(small_source, tmp_path / "a", shard_size=5, seed=0))
    b = build(cfg(small_source, tmp_path / "b", shard_size=5, seed=1))
    assert a["counts"] == b["counts"]
    la = [c for _, _, c in all_records(tmp_path / "a", "train")]
    lb = [c for _, _, c in all_records(tmp_path / "b", "train")]
    assert sorted(la) == sorted(lb) and la != lb
    assert la != sorted(la)


def test_shard_tars_are_standard_ustar(tmp_path):
    """Our hand-built headers give exactly the bytes Python's tarfile writes for the same members."""
    from prep.shards import ShardWriter
    rng = np.random.default_rng(0)
    members = [(f"{k:08d}", rng.integers(0, 256, 300 + 517 * k, dtype=np.uint8).tobytes(), k * 7) for k in range(6)]
    writer = ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx")
    for key, data, label in members:
        writer.add(key, data, label)
    writer.commit()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, label in members:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o644, 0, 0
                tar.addfile(info, io.BytesIO(payload))
    assert (tmp_path / "s.tar").read_bytes() == buf.getvalue()
    assert read_tar(tmp_path / "s.tar") == {k: (d, c) for k, d, c in members}


def test_index_files_equal_what_dalis_wds2idx_writes(small_records, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # shipped with nvidia-dali
    for split in ("train", "val"):
        for tar, idx in shard_paths(small_records, split):
            ref = tmp_path / f"{split}-{tar.stem}.idx"
            with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as ic:
                ic.create_index()
            assert idx.read_bytes() == ref.read_bytes()


# ---------------------------------------------------------------- odd inputs and layouts

def _odd_source(root: Path) -> dict[str, str | None]:
    """Class folders with every odd input ImageNet (or a user) throws at us.

    Returns {rel path: None if it must become a record, else a word of the skip reason}.
    """
    expect = {}

    def put(rel, data, skip=None):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expect[rel] = skip

    a, b = "train/n00000001", "train/n00000002"
    put(f"{a}/rgb.JPEG", _jpeg(_textured(500, 375, 1)))
    put(f"{a}/cmyk.JPEG", _jpeg(_solid(500, 333, (200, 30, 30)), mode="CMYK"))
    put(f"{a}/gray.JPEG", _jpeg(_solid(375, 500, (90, 90, 90)), mode="L"))
    put(f"{a}/png_as.JPEG", _jpeg(_solid(320, 240, (10, 200, 10)), fmt="PNG"))
    put(f"{b}/huge.JPEG", _jpeg(_textured(4200, 3000, 2)))
    put(f"{b}/tiny.JPEG", _jpeg(_solid(3, 2, (10, 20, 250))))
    put(f"{b}/extreme.JPEG", _jpeg(_solid(2000, 20, (250, 250, 0))))
    put(f"{b}/palette.png", _jpeg(np.asarray(Image.fromarray(_textured(64, 48, 5)).convert("P").convert("RGB")),
                                  mode="P", fmt="PNG"))
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60), 40000, np.uint16)).save(buf, "PNG")  # 16-bit grey
    put(f"{b}/deep16.JPEG", buf.getvalue())
    put(f"{a}/zero.JPEG", b"", skip="zero-byte")
    put(f"{a}/notes.txt", b"not an image at all\n", skip="not an image")
    put(f"{b}/cut.JPEG", _jpeg(_textured(500, 375, 3))[:4000], skip="truncated")
    put("val/n00000001/v1.JPEG", _jpeg(_textured(500, 375, 7)))
    put("val/n00000002/v2.JPEG", _jpeg(_textured(375, 500, 8)))
    return expect


def test_odd_inputs_become_records_or_listed_skips(tmp_path):
    src = tmp_path / "src"
    expect = _odd_source(src)
    summary = build(cfg(src, tmp_path / "out", shard_size=4, workers=2))
    skipped = {s["path"]: s["reason"] for s in json.loads((tmp_path / "out" / "skipped.json").read_text())}
    assert set(skipped) == {rel for rel, why in expect.items() if why}
    for rel, why in expect.items():
        if why:
            assert why in skipped[rel], (rel, skipped[rel])
    assert summary["counts"] == {"train": 9, "val": 2} and summary["skipped"] == 3
    got = {}
    for key, jpg, label in all_records(tmp_path / "out", "train"):
        arr = np.asarray(Image.open(io.BytesIO(jpg)))
        assert arr.shape == (256, 256, 3)
        got.setdefault(label, []).append(arr.reshape(-1, 3).mean(axis=0))
    assert len(got[0]) == 4 and len(got[1]) == 5
    colours = np.array(got[0] + got[1])
    # CMYK red stays red, grey stays grey, tiny blue and extreme yellow keep their colour,
    # 16-bit grey 40000/65535 -> 156/255 (scaled, not clipped to 255)
    for rgb in ((200, 30, 30), (90, 90, 90), (10, 200, 10), (10, 20, 250), (250, 250, 0), (156, 156, 156)):
        assert np.min(np.abs(colours - rgb).max(axis=1)) < 6, rgb


def _flat_val(src: Path) -> dict[str, str]:
    """Move val/<wnid>/x.JPEG to val/x.JPEG; return {stem: wnid}."""
    labels = {}
    for path in sorted((src / "val").glob("*/*.JPEG")):
        labels[path.stem] = path.parent.name
        path.rename(src / "val" / path.name)
    for d in list((src / "val").iterdir()):
        if d.is_dir():
            d.rmdir()
    return labels


@pytest.mark.parametrize("fmt", ["kaggle_csv", "text"])
def test_flat_val_with_label_file(small_source, small_records, tmp_path, fmt):
    src = tmp_path / "src"
    make_sample_set(src, classes=3, train_per_class=8, val_per_class=3, seed=1, workers=1)
    labels = _flat_val(src)
    lab = tmp_path / "labels"
    if fmt == "kaggle_csv":
        lab.write_text("ImageId,PredictionString\n" + "".join(
            f"{stem},{w} 1 2 3 4 {w} 5 6 7 8\n" for stem, w in reversed(labels.items())))
    else:
        lab.write_text("".join(f"{stem}.JPEG {w}\n" for stem, w in labels.items()))
    build(cfg(src, tmp_path / "out", shard_size=5, val_labels=str(lab)))
    flat = all_records(tmp_path / "out", "val")
    nested = all_records(small_records, "val")
    assert [(j, c) for _, j, c in flat] == [(j, c) for _, j, c in nested]  # same images, labels, order


def test_flat_val_errors_name_the_file(small_source, tmp_path):
    src = tmp_path / "src"
    make_sample_set(src, classes=2, train_per_class=4, val_per_class=2, seed=1, workers=1)
    labels = _flat_val(src)
    stem = sorted(labels)[0]
    with pytest.raises(SourceError, match="pass --val-labels"):
        build(cfg(src, tmp_path / "o1"))
    bad = tmp_path / "bad.txt"
    bad.write_text("".join(f"{s} {'n12345678' if s == stem else w}\n" for s, w in labels.items()))
    with pytest.raises(SourceError, match=f"{stem}.JPEG: unknown class 'n12345678'"):
        build(cfg(src, tmp_path / "o2", val_labels=str(bad)))
    partial = tmp_path / "partial.txt"
    partial.write_text("".join(f"{s} {w}\n" for s, w in labels.items() if s != stem))
    with pytest.raises(SourceError, match=f"{stem}.JPEG: no label"):
        build(cfg(src, tmp_path / "o3", val_labels=str(partial)))
    with pytest.raises(SourceError, match="cannot read"):
        build(cfg(src, tmp_path / "o4", val_labels=str(tmp_path / "missing.csv")))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing written


def test_val_class_folder_unknown_to_train_is_an_error(tmp_path):
    src = tmp_path / "src"
    make_sample_set(src, classes=2, train_per_class=4, val_per_class=1, seed=1, workers=1)
    (src / "val" / wnid(0)).rename(src / "val" / "n77777777")
    with pytest.raises(SourceError, match="n77777777"):
        build(cfg(src, tmp_path / "out"))


def test_source_errors_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notrain" / "val").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "n1").mkdir(parents=True)
    for source, words in ((tmp_path / "missing", "no such folder"), (empty, "no train/"),
                          (tmp_path / "notrain", "no train/"), (tmp_path / "noimg", "no files")):
        assert main(["--source", str(source), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
        assert not out.exists()


def test_bad_flags_are_usage_errors(capsys):
    for argv in (["--workers", "0"], ["--quality", "101"], ["--shard-size", "0"], ["--bogus", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("build_records.py: error: ") and err.count("\n") == 1, err


# ---------------------------------------------------------------- determinism, resume, reuse

def test_worker_count_does_not_change_a_byte(small_source, small_records, tmp_path):
    build(cfg(small_source, tmp_path / "w2", shard_size=5, workers=2))
    assert tree_bytes(tmp_path / "w2") == tree_bytes(small_records)


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_build_resumes_to_identical_output(small_source, small_records, tmp_path, workers):
    out = tmp_path / "out"
    done = []

    def interrupt(split, index):
        done.append((split, index))
        if len(done) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the build

    with pytest.raises(KeyboardInterrupt):
        build(cfg(small_source, out, shard_size=5, workers=workers), on_shard=interrupt)
    assert not (out / "meta.json").exists()  # not complete, so not visible as records
    finished = [out / split / f"shard-{i:06d}.tar" for split, i in done]  # reported complete
    assert len(finished) == 3 and all(p.is_file() for p in finished)
    stamp = {p: p.stat().st_mtime_ns for p in finished}
    (out / "train" / ".shard-000003.tar.99999.tmp").write_bytes(b"half a shard")  # a killed writer
    resumed = []
    summary = build(cfg(small_source, out, shard_size=5, workers=workers),
                    on_shard=lambda s, i: resumed.append((s, i)))
    assert not set(resumed) & set(done)  # finished shards were kept, not redone
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert summary["images_processed"] < sum(summary["counts"].values()) + summary["skipped"]
    assert tree_bytes(out) == tree_bytes(small_records)


KILLED_AFTER_FIRST_SHARD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from prep import build_records, workers
real_publish = workers.publish

def publish(pending):
    real_publish(pending)
    if any(path.parent.name == "train" and path.suffix == ".json" for _, path in pending):
        os.kill(os.getpid(), signal.SIGKILL)   # right after the first train shard is done

workers.publish = publish
sys.exit(build_records.main(sys.argv[1:]))
"""


def test_killed_build_resumes_to_identical_output(sample_source, sample_records, tmp_path):
    """A real SIGKILL of the CLI in the middle of a build (planted right after its first
    finished train shard, not timed from outside), then the same command again."""
    out = tmp_path / "out"
    argv = ["--source", str(sample_source), "--out", str(out), "--workers", "1", "--shard-size", "16",
            "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_SHARD.format(repo=str(REPO)), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "meta.json").exists()
    assert len(list(out.glob("train/shard-*.tar"))) == 1
    rerun = subprocess.run([sys.executable, str(REPO / "prep" / "build_records.py"), *argv],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_bytes(out) == tree_bytes(sample_records)


# The real CLI with a fault planted in the worker process that writes train shard 2, after its
# 2nd record (its temp tar half written). Workers are forked, so the patch reaches them.
FAULTY_CLI = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from prep import build_records, shards
real_add = shards.ShardWriter.add

def add(self, *args):
    real_add(self, *args)
    if self.tar_path.parent.name == "train" and self.tar_path.name == "shard-000002.tar" and self.count == 2:
        {fault}

shards.ShardWriter.add = add
sys.exit(build_records.main(sys.argv[1:]))
"""


def _faulty_build(source: Path, out: Path, fault: str, *, then=None, timeout: float = 60):
    """Run the CLI (2 workers) with ``fault`` planted; ``then(proc)`` runs while it is running.
    Returns (exit status, stderr, seconds); a build still running after ``timeout`` is a hang."""
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the fault is planted by patching the parent before its workers are forked")
    argv = ["--source", str(source), "--out", str(out), "--shard-size", "5", "--workers", "2", "--no-progress"]
    code = FAULTY_CLI.format(repo=str(REPO), fault=fault)
    t0 = time.monotonic()
    # SIGINT back to its default in the child: a shell ignores it for background jobs (CI), and
    # Python installs its Ctrl-C handler only where SIGINT is not ignored at start
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if then:
            then(proc)
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the build hangs: still running after {timeout} s")
    return proc.returncode, err, time.monotonic() - t0


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("holding", ["", "from prep import workers; workers._SHARED_COUNTER.get_lock().acquire(); "],
                         ids=["plain", "holding-the-progress-lock"])
def test_dead_worker_ends_the_build_with_one_line_and_a_rerun_completes(small_source, small_records, tmp_path,
                                                                       holding):
    """A worker killed mid-shard (as the out-of-memory killer does, possibly while it holds the
    shared progress counter's lock) must not hang the build."""
    out = tmp_path / "out"
    status, err, seconds = _faulty_build(small_source, out, holding + "os.kill(os.getpid(), signal.SIGKILL)")
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: --out {out}: a worker process died (signal 9, SIGKILL"), err
    assert "while writing shard train/shard-000002;" in lines[0], err
    assert lines[0].endswith("finished shards are kept, rerun the same command to resume"), err
    assert seconds < 60, f"{seconds:.1f} s to notice the dead worker"
    assert not (out / "meta.json").exists()
    assert not (out / "train" / "shard-000002.tar").exists() and not _temp_files(out)  # nothing half-written
    rerun = subprocess.run([sys.executable, str(REPO / "prep" / "build_records.py"), "--source", str(small_source),
                            "--out", str(out), "--shard-size", "5", "--workers", "2", "--no-progress"],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_bytes(out) == tree_bytes(small_records)


def test_ctrl_c_stops_the_workers_mid_shard(small_source, small_records, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while a worker is busy
    with a long shard: exit 130 at once, not after that shard; the rerun completes."""
    out, busy = tmp_path / "out", tmp_path / "busy"

    def ctrl_c(proc):
        deadline = time.monotonic() + 60
        while not busy.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)

    status, err, seconds = _faulty_build(small_source, out, f"open({str(busy)!r}, 'w').close(); time.sleep(600)",
                                         then=ctrl_c)
    assert status == 130, err
    assert err.strip() == "interrupted: finished shards are kept; rerun the same command to resume", err
    assert seconds < 60
    assert not (out / "meta.json").exists() and not _temp_files(out)
    assert build(cfg(small_source, out, shard_size=5, workers=2))["images_processed"] > 0
    assert tree_bytes(out) == tree_bytes(small_records)


def test_complete_output_is_reused_and_checked(small_source, tmp_path):
    out = tmp_path / "out"
    build(cfg(small_source, out, shard_size=5))
    before = tree_bytes(out)
    again = build(cfg(small_source, out, shard_size=5, workers=2))
    assert again["reused"] and again["images_processed"] == 0 and tree_bytes(out) == before
    with pytest.raises(PrepError, match=r"other parameters \(quality: 90 -> 80\).*--overwrite"):
        build(cfg(small_source, out, shard_size=5, quality=80))
    assert tree_bytes(out) == before  # the refusal changed nothing
    build(cfg(small_source, out, shard_size=5, quality=80, overwrite=True))
    assert read_meta(out)["params"]["quality"] == 80
    whole = tree_bytes(out)
    (out / read_meta(out)["shards"]["val"][0]).unlink()
    with pytest.raises(PrepError, match="missing shard files.*rerun the same command with --repair"):
        build(cfg(small_source, out, shard_size=5, quality=80))
    (out / "stats.json").unlink()                 # the statistics: recomputed from the source by --repair
    with pytest.raises(PrepError, match=r"stats.json: missing .*rerun the same command with --repair"):
        build(cfg(small_source, out, shard_size=5, quality=80))
    assert not build(cfg(small_source, out, shard_size=5, quality=80, repair=True))["reused"]
    assert tree_bytes(out) == whole


def _flip_a_bit_inside_a_jpeg(tar: Path) -> None:
    """One bit in the middle of the first record's JPEG data: the JPEG usually still decodes."""
    line = (tar.with_suffix(".idx")).read_text().splitlines()[1].split()
    offset, size = int(line[1]), int(line[2])
    with open(tar, "r+b") as fh:
        fh.seek(offset + size // 2)
        byte = fh.read(1)[0]
        fh.seek(offset + size // 2)
        fh.write(bytes([byte ^ 0x10]))


def test_repair_rebuilds_exactly_the_damaged_shards(small_source, small_records, tmp_path, capsys):
    """A shard changed on disk (a flipped bit) and a lost index: prep.verify names the changed
    shard by its checksum, the plain command refuses with one line, and --repair rebuilds exactly
    those two shards, byte-identical to a clean build, leaving every other file untouched."""
    import zlib

    from prep.verify import VerifyConfig, verify
    out = tmp_path / "out"
    build(cfg(small_source, out, shard_size=5))
    meta = read_meta(out)
    assert meta["crc32"] == {p.relative_to(out).as_posix(): zlib.crc32(p.read_bytes())   # independent
                             for rel in meta["shards"]["train"] + meta["shards"]["val"]
                             for p in (out / rel, (out / rel).with_suffix(".idx"))}
    damaged, lost = out / meta["shards"]["train"][1], out / meta["shards"]["val"][0]
    _flip_a_bit_inside_a_jpeg(damaged)
    lost.with_suffix(".idx").unlink()
    lost.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar") if p != damaged}
    capsys.readouterr()
    assert main(["--source", str(small_source), "--out", str(out), "--shard-size", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(lost) in err and "--repair" in err
    summary = build(cfg(small_source, out, shard_size=5, repair=True))
    said = capsys.readouterr().out
    assert f"damaged: {damaged}: changed since the build" in said and f"damaged: {lost}: missing" in said
    assert f"repaired: {damaged}" in said and f"repaired: {lost}" in said
    assert summary["images_processed"] == 10                          # two shards of 5 inputs
    assert tree_bytes(out) == tree_bytes(small_records)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the others were not rewritten
    assert verify(VerifyConfig(str(out), workers=1, progress=False)) == 0
    again = build(cfg(small_source, out, shard_size=5, repair=True))  # nothing left to repair
    assert again["reused"] and again["images_processed"] == 0


def test_verify_finds_a_changed_shard_that_still_decodes(small_source, tmp_path, capsys):
    from prep.verify import VerifyConfig, verify
    out = tmp_path / "out"
    build(cfg(small_source, out, shard_size=5))
    damaged = out / read_meta(out)["shards"]["train"][0]
    _flip_a_bit_inside_a_jpeg(damaged)
    assert verify(VerifyConfig(str(out), workers=1, progress=False)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{damaged} -: changed since the build: CRC-32 of {damaged.name} is ")
    assert "--repair" in lines[-1]


def test_repair_of_records_without_checksums_finds_what_the_index_check_finds(small_source, small_records,
                                                                             tmp_path, capsys):
    """Records built before the checksums: --repair says what it cannot see, and still rebuilds
    a truncated shard (the index check against its tar) and a missing one."""
    out = tmp_path / "out"
    build(cfg(small_source, out, shard_size=5))
    meta = read_meta(out)
    del meta["crc32"]
    (out / "meta.json").write_text(json.dumps(meta))
    truncated, lost = out / meta["shards"]["train"][0], out / meta["shards"]["train"][2]
    truncated.write_bytes(truncated.read_bytes()[:-700])
    lost.unlink()
    capsys.readouterr()
    assert build(cfg(small_source, out, shard_size=5, repair=True))["images_processed"] == 10
    said = capsys.readouterr().out
    assert "has no checksums" in said and f"damaged: {truncated}: " in said and f"damaged: {lost}: missing" in said
    assert {k: v for k, v in tree_bytes(out).items() if k != "meta.json"} == \
        {k: v for k, v in tree_bytes(small_records).items() if k != "meta.json"}


def test_a_shard_finished_by_an_older_build_gets_its_checksums_on_resume(small_source, small_records, tmp_path):
    """A build interrupted under the code before checksums (its partials have none) resumes
    without redoing its finished shards and ends with meta.json's checksums all the same."""
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop(split, index):
        raise Stop

    with pytest.raises(Stop):
        build(cfg(small_source, out, shard_size=5), on_shard=stop)
    (part,) = (out / ".partial").glob("*/*.json")
    old = json.loads(part.read_text())
    del old["crc32"]
    part.write_text(json.dumps(old))
    summary = build(cfg(small_source, out, shard_size=5))
    assert summary["images_processed"] < sum(summary["counts"].values()) + summary["skipped"]   # kept
    assert tree_bytes(out) == tree_bytes(small_records)


def test_repair_refuses_a_shard_that_comes_back_different(small_source, tmp_path, monkeypatch):
    """The rebuilt shard must equal the original build's (other JPEG bytes, as from another
    libjpeg): refused with one line, the rebuilt files removed, the other shards kept."""
    out = tmp_path / "out"
    build(cfg(small_source, out, shard_size=5))
    damaged = out / read_meta(out)["shards"]["train"][0]
    _flip_a_bit_inside_a_jpeg(damaged)
    real = transform.encode_jpeg
    monkeypatch.setattr(transform, "encode_jpeg", lambda pixels, quality: real(pixels, quality - 1))
    with pytest.raises(PrepError, match=r"the rebuilt train/shard-000000.tar differs from the original build.*--overwrite"):
        build(cfg(small_source, out, shard_size=5, repair=True))
    assert not damaged.exists() and not damaged.with_suffix(".idx").exists()
    assert (out / read_meta(out)["shards"]["train"][1]).is_file()
    assert not (out / ".partial").exists() and not list(out.rglob(".*.tmp"))
    monkeypatch.setattr(transform, "encode_jpeg", real)
    with pytest.raises(PrepError, match="--repair"):                  # the same command: the shard is missing
        build(cfg(small_source, out, shard_size=5))
    assert build(cfg(small_source, out, shard_size=5, overwrite=True))["images_processed"] > 0   # what it says
    assert verify.verify(verify.VerifyConfig(str(out), workers=1, progress=False)) == 0


def test_other_source_in_out_is_refused(small_source, tmp_path):
    other = tmp_path / "other"
    make_sample_set(other, classes=2, train_per_class=4, val_per_class=1, seed=5, workers=1)
    out = tmp_path / "out"
    build(cfg(small_source, out, shard_size=5))
    assert main(["--source", str(other), "--out", str(out), "--shard-size", "5", "--no-progress"]) == 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "stats.json").write_text("{}")
    with pytest.raises(PrepError, match="unrecognised content"):
        build(cfg(small_source, tmp_path / "junk"))


# ---------------------------------------------------------------- readers

def test_readers_give_clear_errors(small_records, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(RecordsError, match="meta.json: missing"):
        read_meta(bad)
    good = json.loads((small_records / "stats.json").read_text())
    for field, value in (("eigvec", [[1, 0], [0, 1]]), ("mean", "x"), ("pixels", 0)):
        (bad / "stats.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(RecordsError, match=f"stats.json: field '{field}'"):
            read_stats(bad)
    (bad / "stats.json").write_text(json.dumps({k: v for k, v in good.items() if k != "cov"}))
    with pytest.raises(RecordsError, match="stats.json: missing field 'cov'"):
        read_stats(bad)
    with pytest.raises(RecordsError, match="missing records folder"):
        shard_paths(bad, "train")
    copy = tmp_path / "copy"
    for rel in ("meta.json", *read_meta(small_records)["shards"]["val"]):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((small_records / rel).read_bytes())
    with pytest.raises(RecordsError, match=r"shard-000000.idx: missing DALI index"):
        shard_paths(copy, "val")
    st = read_stats(small_records)
    assert st.mean.shape == (3,) and st.eigvec.shape == (3, 3) and isinstance(st.pixels, int)


# ---------------------------------------------------------------- the built-in sample set

def test_sample_set_is_deterministic_with_planted_odd_files(tmp_path):
    a = make_sample_set(tmp_path / "a", classes=3, train_per_class=5, val_per_class=2, seed=0, workers=1)
    b = make_sample_set(tmp_path / "b", classes=3, train_per_class=5, val_per_class=2, seed=0, workers=2)
    fa = {p.relative_to(a): p.read_bytes() for p in sorted(a.rglob("*.JPEG"))}
    fb = {p.relative_to(b): p.read_bytes() for p in sorted(b.rglob("*.JPEG"))}
    assert fa == fb and len(fa) == 3 * 5 + 1 + 3 * 2
    kinds, sizes = {}, set()
    for rel, data in fa.items():
        try:
            with Image.open(io.BytesIO(data)) as img:
                kinds[(img.format, img.mode)] = kinds.get((img.format, img.mode), 0) + 1
                sizes.add(img.size)
                img.load()
        except OSError:
            kinds["corrupt"] = kinds.get("corrupt", 0) + 1
    assert kinds[("JPEG", "L")] >= 1 and kinds[("JPEG", "CMYK")] >= 1
    assert kinds[("PNG", "RGB")] == 1 and kinds["corrupt"] == 1
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)


def test_default_run_generates_the_sample_and_builds(tmp_path, monkeypatch):
    import prep.build_records as br
    monkeypatch.setattr(br, "DEFAULT_SAMPLE", tmp_path / "sample")
    monkeypatch.setattr(br, "DEFAULT_RECORDS", tmp_path / "records")
    monkeypatch.setattr(br, "SAMPLE_PARAMS", {"classes": 2, "train_per_class": 4, "val_per_class": 1, "seed": 0})
    assert main(["--no-progress"]) == 0
    assert read_meta(tmp_path / "records")["counts"] == {"train": 8, "val": 2}
    assert main(["--no-progress"]) == 0  # rerun: reuses both
