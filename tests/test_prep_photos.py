"""The records on real photographs: the resize is alias-free and smooth, the statistics exact.

The references here are independent of prep/transform.py: an exact area integral (float64
matrices) for shrinking, Pillow's float bicubic for enlarging, on the same central square
(offset rounded down to a whole pixel, like ours), then the same JPEG loss as the records.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from prep import transform
from records.folder import read_meta, read_stats, shard_paths
from tests.test_prep import read_tar


def _area_matrix(n_in: int, start: int, side: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an exact box integral: output j covers [start + j*s, start + (j+1)*s)."""
    s, m = side / n_out, np.zeros((n_out, n_in))
    for j in range(n_out):
        a, b = start + j * s, start + (j + 1) * s
        for i in range(int(np.floor(a)), int(np.ceil(b))):
            m[j, i] = max(0.0, min(b, i + 1) - max(a, i)) / s
    return m


def reference(src: np.ndarray, size: int = 256) -> np.ndarray:
    """Float reference of shorter side -> size + central crop, uint8 after rounding."""
    h, w = src.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    if side >= size:  # exact area averaging
        my, mx = _area_matrix(h, y0, side, size), _area_matrix(w, x0, side, size)
        out = np.stack([my @ src[..., c].astype(np.float64) @ mx.T for c in range(3)], axis=-1)
    else:  # smooth interpolation of the square
        sq = src[y0:y0 + side, x0:x0 + side]
        out = np.stack([np.asarray(Image.fromarray(sq[..., c].astype(np.float32), "F")
                                   .resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _jpeg_roundtrip(arr: np.ndarray, quality: int = 90) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(transform.encode_jpeg(arr, quality))).convert("RGB"))


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _records_by_source(photo_source, photo_records):
    """[(source RGB array, record RGB array)] for every train and val record."""
    meta = read_meta(photo_records)
    files = {}
    for split in ("train", "val"):
        for p in sorted((photo_source / split).rglob("*.JPEG")):
            files.setdefault(split, []).append(p)
    pairs = []
    for split in ("train", "val"):
        recs = {}
        for tar, _ in shard_paths(photo_records, split):
            recs.update(read_tar(tar))
        assert len(recs) == meta["counts"][split] == len(files[split])
        # keys follow the seeded order; match records to sources by content instead of by order
        srcs = [_decode_rgb(p.read_bytes()) for p in files[split]]
        refs = [_jpeg_roundtrip(reference(s)).astype(float) for s in srcs]
        for jpg, _ in recs.values():
            rec = _decode_rgb(jpg).astype(float)
            k = int(np.argmin([np.abs(rec - r).mean() for r in refs]))
            pairs.append((srcs[k], rec, refs[k]))
    return pairs


def test_records_match_an_antialiased_reference_after_the_same_jpeg_loss(photo_source, photo_records):
    pairs = _records_by_source(photo_source, photo_records)
    shrunk = [np.abs(rec - ref).mean() for s, rec, ref in pairs if min(s.shape[:2]) > 256]
    enlarged = [np.abs(rec - ref).mean() for s, rec, ref in pairs if min(s.shape[:2]) < 256]
    assert len(shrunk) >= 8 and len(enlarged) >= 3
    # Area averaging is the reference's own filter: only rounding and JPEG noise differ (measured
    # 0.03 levels mean). Pillow's BOX (point-sampled at non-integer factors) gives ~2.8.
    assert max(shrunk) < 0.6, shrunk
    # Enlarging: OpenCV's bicubic (a=-0.75) vs Pillow's (a=-0.5): 1.55 levels mean; pixel-repeating
    # BOX 4.9, OpenCV's area 2.2, bilinear 2.3.
    assert np.mean(enlarged) < 2.0, enlarged


def _same_adjacent(arr: np.ndarray) -> float:
    """Share of horizontally adjacent pixel pairs with identical RGB."""
    return float((arr[:, 1:] == arr[:, :-1]).all(-1).mean())


def test_enlarged_photos_are_not_blocky(photo_source):
    checked = 0
    for p in sorted(photo_source.rglob("*.JPEG")):
        src = _decode_rgb(p.read_bytes())
        if min(src.shape[:2]) >= 230:  # only clear enlargements (>= 1.1x)
            continue
        rec = transform.decode_record(p.read_bytes())
        # Pixel repetition (nearest-neighbour-like enlarging) makes runs of identical pixels far
        # more common than in the source photo itself; interpolation keeps them about as rare.
        assert _same_adjacent(rec) <= _same_adjacent(src) + 0.05, (p.name, _same_adjacent(rec), _same_adjacent(src))
        checked += 1
    assert checked >= 3


def test_photo_stats_equal_independent_float64_computation(photo_source, photo_records):
    pixels = np.concatenate([transform.decode_record(p.read_bytes()).reshape(-1, 3)
                             for p in sorted((photo_source / "train").rglob("*.JPEG"))]).astype(np.float64)
    st = read_stats(photo_records)
    assert json.loads((photo_records / "stats.json").read_text())["pixels"] == len(pixels)
    np.testing.assert_allclose(st.mean, pixels.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(st.cov, np.cov(pixels.T, bias=True), rtol=1e-10, atol=1e-8)


def test_photo_set_cli_refuses_a_bad_root_with_one_line(tmp_path, capsys):
    """``python -m bench.photos ROOT`` where ROOT is under a file: exit 2, one line naming it."""
    from bench.photos import main as photos_main
    (tmp_path / "a-file").write_text("x")
    assert photos_main([str(tmp_path / "a-file" / "set"), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'a-file'}") and "Not a directory" in err
