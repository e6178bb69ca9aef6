"""The loader bench (bench/loaders.py) and its baselines (bench/baselines.py).

Checks the views against the numpy reference (exact arithmetic, exact FFCV crops), the
output contract of every loader (shape, dtype, layout, values = a uint8 image plus one
constant per image and channel), and that the bench prints a table and writes well-formed
JSON. No timing is asserted: the numbers only have to be positive and ordered.
"""
from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from bench import baselines as B
from bench import loaders
from pipeline.finish import finish
from pipeline import reference as ref
from records.folder import Stats, read_meta, read_stats, shard_paths

BATCH = 8


@pytest.fixture(scope="module")
def ffcv_records(sample_source, tmp_path_factory):
    """Records of the sample set with FFCV's train.beton/val.beton (the shared fixture has none)."""
    from prep.build_records import PrepConfig, build
    out = tmp_path_factory.mktemp("records_ffcv")
    build(PrepConfig(source=str(sample_source), out=str(out), workers=1, shard_size=16,
                     progress=False, ffcv=True))
    return out


@pytest.fixture(scope="module")
def bench_run(ffcv_records):
    """One bench run over every loader (tiny: 2 repeats × 2 batches of 8), output captured."""
    cfg = loaders.BenchConfig(records=str(ffcv_records), loaders="auto", batch_size=BATCH,
                            batches=2, warmup=1, repeats=2, threads=2, progress=False)
    console = Console(file=io.StringIO(), width=160)
    result, streams = loaders.bench(cfg, console)
    return result, streams, console.file.getvalue()


# ----------------------------------------------------------------------------- arithmetic

def test_crop_view_is_the_reference_train_view(sample_records):
    stats = read_stats(sample_records)
    tar, _ = shard_paths(sample_records, "train")[0]
    rng = np.random.default_rng(1)
    for _, jpeg, _ in list(ref.iter_tar(tar))[:4]:
        img = ref.decode(jpeg)
        for _ in range(3):
            d = ref.draw(rng)
            shift = ref.lighting_shift(d.alpha, stats.eigval, stats.eigvec)
            got = B.crop_view(img, d, shift, stats.mean)
            want = ref.train_view(img, d.y, d.x, d.flip, d.alpha, stats, stats.mean)
            assert got.dtype == np.float32 and got.shape == (3, 224, 224) and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("compiled", [False, True])
def test_ffcv_lighting_op_is_the_reference_lighting(sample_records, compiled):
    """light_one on a (mirrored) window == ref.train_view of the full image, same draws."""
    from numba import njit
    one = njit(B.light_one) if compiled else B.light_one
    stats = read_stats(sample_records)
    lmat = B.lighting_matrix(stats)
    tar, _ = shard_paths(sample_records, "train")[0]
    img = ref.decode(next(ref.iter_tar(tar))[1])
    rng = np.random.default_rng(2)
    for _ in range(3):
        d = ref.draw(rng)
        window = img[d.y:d.y + 224, d.x:d.x + 224]
        window = np.ascontiguousarray(window[:, ::-1] if d.flip else window)
        out = np.empty((3, 224, 224), np.float32)
        one(window, out, d.alpha, lmat, np.asarray(stats.mean, np.float32))
        want = ref.train_view(img, d.y, d.x, d.flip, d.alpha, stats, stats.mean)
        # L @ alpha vs eigvec @ (alpha * eigval): float64 sums in another order, so the
        # float32 shift may differ in its last bit (|values| < 2000: 1 ulp < 2.5e-4).
        np.testing.assert_allclose(out, want, rtol=0, atol=2.5e-4)


def test_lighting_matrix_is_the_papers_shift_in_levels():
    """Hand-made stats: eigenvectors = a rotation about R (cos 0.6, sin 0.8); eigenvalues of the
    0–1 pixel covariance 0.08, 0.02, 0.004, stored as 0–255² variances (x 65025). The paper's
    shift per unit alpha is lambda_i p_i in 0–1 units, i.e. 255 lambda_i p_i = 20.4, 5.1 and
    1.02 levels along p_1, p_2, p_3."""
    eigvec = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, -0.8], [0.0, 0.8, 0.6]])
    eigval = np.array([5202.0, 1300.5, 260.1])
    stats = Stats(pixels=1, mean=np.zeros(3), std=np.ones(3), cov=eigvec @ np.diag(eigval) @ eigvec.T,
                  eigval=eigval, eigvec=eigvec)
    want = np.array([[20.4, 0.0, 0.0],
                     [0.0, 5.1 * 0.6, -1.02 * 0.8],     # 3.06, -0.816
                     [0.0, 5.1 * 0.8, 1.02 * 0.6]])     # 4.08, 0.612
    np.testing.assert_allclose(B.lighting_matrix(stats), want, rtol=1e-12, atol=1e-12)


def test_shard_samples_give_each_samples_bytes(sample_records):
    for tar, idx in shard_paths(sample_records, "train"):
        samples = B.shard_samples(tar, idx)
        expected = list(ref.iter_tar(tar))
        assert len(samples) == len(expected)
        with open(tar, "rb") as fh:
            for s, (_, jpeg, label) in zip(samples, expected):
                fh.seek(s.jpg_offset)
                assert fh.read(s.jpg_size) == jpeg
                fh.seek(s.cls_offset)
                assert int(fh.read(s.cls_size)) == label


def test_ffcv_pinned_random_resized_crop_is_an_exact_window(ffcv_records):
    """scale = ratio = 1 at (224/256)²: every output is a 224×224 window of the full decode
    at an integer offset in 0..32 — no resampling (what the FFCV baseline relies on)."""
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToTensor
    area = (224 / 256) ** 2
    pinned = RandomResizedCropRGBImageDecoder((224, 224), scale=(area, area), ratio=(1.0, 1.0))
    loader = Loader(str(ffcv_records / "train.beton"), batch_size=BATCH, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=True, pipelines={
                        "image": [SimpleRGBImageDecoder(), ToTensor()],      # the full image
                        "crop": PipelineSpec("image", decoder=pinned, transforms=[ToTensor()]),
                        "label": None})
    a, c = next(iter(loader))
    assert a.shape == (BATCH, 256, 256, 3) and c.shape == (BATCH, 224, 224, 3)
    for img, win in zip(a.numpy(), c.numpy()):
        hits = [(y, x) for y in range(33) for x in range(33)
                if np.array_equal(img[y:y + 224, x:x + 224], win)]
        assert hits, "FFCV's pinned crop is not an exact window of the image"


# ----------------------------------------------------------------------------- loader outputs

def _is_uint8_plus_constants(images: torch.Tensor) -> bool:
    """Each (image, channel) plane = integers 0..255 plus one float constant (mean, lighting)."""
    planes = images.double().flatten(2)                     # (B, 3, H*W)
    rel = planes - planes.min(dim=2, keepdim=True).values
    near_int = (rel - rel.round()).abs().max() < 1e-2       # float32 at |v| < 2000
    return bool(near_int) and float(rel.max()) <= 255 + 1e-2


@pytest.mark.parametrize("name", loaders.ALL_LOADERS)
def test_each_loader_gives_the_contracted_batch(bench_run, ffcv_records, name):
    _, streams, _ = bench_run
    images, labels = streams[name].next()
    if name in loaders.FLOORS:       # decode only: the 256×256 RGB records, uint8 HWC
        assert images.shape == (BATCH, 256, 256, 3) and images.dtype == torch.uint8
        assert labels is None
        return
    if name == "dali-u8":          # the host side: window, uint8 HWC; finish mirrors, makes the view
        assert images.shape == (BATCH, 224, 224, 3) and images.dtype == torch.uint8
        images = finish(streams[name].u8).contiguous()
    assert images.shape == (BATCH, 3, 224, 224) and images.dtype == torch.float32
    assert images.is_contiguous() and images.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
    classes = len(read_meta(ffcv_records)["classes"])
    assert 0 <= int(labels.min()) and int(labels.max()) < classes
    assert _is_uint8_plus_constants(images)
    # mean subtracted and lighting applied: the per-image constants differ between images
    offsets = images.double().flatten(2).min(dim=2).values    # (B, 3)
    assert float(offsets.std(dim=0).max()) > 1.0


# ----------------------------------------------------------------------------- the bench

def test_bench_table_and_result_are_well_formed(bench_run):
    result, _, printed = bench_run
    assert set(result) == {"machine", "loaders"}
    m = result["machine"]
    assert {"cpu", "cores", "gpu", "versions", "date"} <= set(m) and m["cores"] >= 1
    assert m["versions"]["nvidia-dali-cuda120"] and m["versions"]["ffcv"] and m["versions"]["torch"]
    assert list(result["loaders"]) == list(loaders.ALL_LOADERS)
    for name, e in result["loaders"].items():
        assert len(e["runs"]) == 2 and all(r > 0 for r in e["runs"])
        assert e["min"] <= e["images_per_s"] <= e["max"]
        assert {"per_core", "vs_decode", "vs_decode_ffcv", "vs_torch"} <= set(e)
        assert name in printed and f"{e['images_per_s']:.0f}" in printed
    assert "img/s median" in printed and "target dali" in printed and "target dali-u8" in printed
    assert result["loaders"]["dali-u8"]["finish_images_per_s"] > 0 and "pipeline.finish" in printed


def test_summary_numbers_by_hand(monkeypatch):
    """Medians, spreads, per-core rates and ratios of made-up runs, worked out by hand:
    medians dali 250, decode 450, torch 125; 4 threads on 2 usable cores -> per core = /2."""
    monkeypatch.setattr(loaders, "usable_cores", lambda: 2)
    stream = SimpleNamespace(last=(torch.zeros(8, 3, 224, 224), torch.zeros(8, dtype=torch.int64)),
                             loader=range(10), u8=None)
    runs = {"dali": [300.0, 200.0, 250.0], "decode": [500.0, 400.0, 450.0], "torch": [100.0, 150.0, 125.0]}
    cfg = loaders.BenchConfig(batch_size=8, batches=2, warmup=1, repeats=3, threads=4)
    out = loaders.summarise(runs, dict.fromkeys(runs, stream), cfg, threads=4)
    dali, decode, torch_ = out["dali"], out["decode"], out["torch"]
    assert (dali["images_per_s"], dali["min"], dali["max"], dali["per_core"]) == (250.0, 200.0, 300.0, 125.0)
    assert dali["vs_decode"] == pytest.approx(5 / 9) and dali["vs_torch"] == pytest.approx(2.0)
    assert torch_["vs_decode"] == pytest.approx(5 / 18) and torch_["per_core"] == 62.5
    assert decode["vs_decode"] == 1.0 and decode["vs_torch"] == pytest.approx(3.6)
    assert "vs_decode_ffcv" not in dali                     # no FFCV floor ran: no ratio to it
    lines = loaders.target_lines(out)                         # 5/9 = 0.56 < 0.75; 2.0 >= 1.5
    assert any("0.56×" in line and "missed" in line for line in lines)
    assert any("2.00×" in line and "met" in line for line in lines)


def test_cli_writes_json_atomically(sample_records, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = loaders.main(["--records", str(sample_records), "--loaders", "dali,decode",
                       "--batch-size", str(BATCH), "--batches", "1", "--warmup", "0",
                       "--repeats", "1", "--threads", "1", "--json", str(out), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert list(data["loaders"]) == ["dali", "decode"] and data["loaders"]["dali"]["images_per_s"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]    # no temp file left
    assert "dali" in capsys.readouterr().out


def test_cli_errors_are_one_line(sample_records, tmp_path, capsys):
    assert loaders.main(["--records", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "nope") in err and err.count("\n") == 1
    # FFCV asked for by name on records without a beton: names the missing file
    assert loaders.main(["--records", str(sample_records), "--loaders", "ffcv", "--no-progress"]) == 2
    assert "train.beton" in capsys.readouterr().err
    # a batch larger than the split: no batch at all, said in one line
    assert loaders.main(["--records", str(sample_records), "--loaders", "decode",
                       "--batch-size", "1000", "--no-progress"]) == 2
    assert "no full batch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        loaders.main(["--loaders", "dali,pil"])
    assert exc.value.code == 2


def test_auto_leaves_out_ffcv_without_a_beton(tmp_path):
    console = Console(file=io.StringIO())
    names = loaders.choose_loaders(loaders.BenchConfig(), tmp_path / "train.beton", console)
    assert names == ["dali", "dali-u8", "torch", "decode"] and "train.beton" in console.file.getvalue()


def test_table_has_no_column_for_loaders_that_did_not_run_and_cuts_no_header():
    """Without FFCV: no ×decode-ffcv column of dashes; on an 80-column terminal every header whole."""
    def entry(rate, **ratios):
        return {"images_per_s": rate, "min": rate - 1, "max": rate + 1, "per_core": rate / 2, "what": "x",
                "epoch_batches": 100, "threads": 2, "batch_size": 32, "batches": 10, "warmup": 8,
                "repeats": 3, **ratios}
    entries = {"dali": entry(300.0, vs_decode=0.75, vs_torch=1.5), "torch": entry(200.0, vs_decode=0.5, vs_torch=1.0),
               "decode": entry(400.0, vs_decode=1.0, vs_torch=2.0)}
    result = {"machine": {"cpu": "AMD EPYC 7B13", "cores": 2, "device": "cpu"}, "loaders": entries}
    console = Console(file=io.StringIO(), width=80)
    loaders.render(result, console)
    text = console.file.getvalue()
    header = next(line for line in text.splitlines() if "loader" in line)
    assert "×decode" in header and "×torch" in header and "ffcv" not in header
    assert "…" not in text and not re.search(r"\s–\s", text)       # no cut header, no dash cell
    assert "0.75×" in text and "1.50×" in text
