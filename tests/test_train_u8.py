"""The uint8 loader path of training (--loader-device cpu, and the GPU loader under
--channels-last): unmirrored uint8 crops, mirrored by ``finish``; what reaches the model is
exactly what the float loader gives, for the train view and both validation
views, and a run on it trains and evaluates."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from engine.loop import LoopSettings, evaluate, to_device
from engine.run import main
from engine.session import RunError, loader_placement
from pipeline import Loader
from pipeline.finish import U8Batch

CPU = torch.device("cpu")


def _pair(records, view, **kw):
    """The first batch of the float and the uint8 loader with the same arguments."""
    args = dict(split="train" if view == "train" else "val", view=view, batch_size=2, seed=5, epoch=1,
                num_threads=1, **kw)
    return (next(iter(Loader(records, dtype=dtype, **args))) for dtype in (torch.float32, torch.uint8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_prepare_of_a_uint8_train_batch_equals_the_float_loaders(sample_records, channels_last):
    settings = LoopSettings(CPU, channels_last=channels_last)
    floats, u8 = _pair(sample_records, "train")
    assert isinstance(u8[0], U8Batch)
    assert u8[0].window[:, 2].tolist() == [0, 1]   # one crop left as cut, one mirrored by finish
    want, labels = to_device(floats, settings)
    got, labels8 = to_device(u8, settings)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 224, 224)
    assert torch.equal(got, want) and torch.equal(labels8, labels)
    # channels_last comes from finish's NHWC buffer, not from a copy of a contiguous batch
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_under_autocast_the_uint8_batch_is_finished_in_the_autocast_dtype(sample_records, amp, dtype):
    """Under bf16/fp16 finish rounds once to the autocast dtype: the float view cast by autocast,
    bit for bit, so the model's output is the float path's exactly (and no float32 batch)."""
    settings = LoopSettings(CPU, amp=amp, channels_last=True)
    floats, u8 = _pair(sample_records, "train")
    assert u8[0].window[:, 2].tolist() == [0, 1]   # the mirror too happens inside finish
    want, _ = to_device(floats, settings)
    got, _ = to_device(u8, settings)
    assert want.dtype == torch.float32 and got.dtype == dtype
    assert torch.equal(got, want.to(dtype)) and got.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(net(got), net(want))


@pytest.mark.gpu
def test_cpu_loader_uint8_finished_on_the_gpu_equals_the_float_view(sample_records):
    """--loader-device cpu for a GPU model: pinned uint8 pixels cross, finish runs on the GPU."""
    settings = LoopSettings(torch.device("cuda:0"), channels_last=True)
    floats, u8 = _pair(sample_records, "train")
    want, labels = to_device(floats, settings)
    got, labels8 = to_device(u8, settings)
    assert got.device == want.device == torch.device("cuda:0") and labels8.device == got.device
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want) and torch.equal(labels8, labels)


def test_evaluate_on_uint8_views_equals_the_float_views(sample_records):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    settings = LoopSettings(CPU, channels_last=True)
    for view in ("center", "tencrop"):
        args = dict(split="val", view=view, batch_size=2, num_threads=1)
        want = evaluate(net, Loader(sample_records, **args), settings)
        got = evaluate(net, Loader(sample_records, dtype=torch.uint8, **args), settings)
        assert got == want and got["images"] == want["images"] > 0, view


def test_loader_placement_follows_the_flag_and_the_model():
    cfg = TrainConfig()
    assert loader_placement(cfg, "cuda:0") == ("cuda:0", torch.float32)
    assert loader_placement(replace(cfg, channels_last=True), "cuda:1") == ("cuda:1", torch.uint8)
    assert loader_placement(replace(cfg, loader_device="cpu"), "cuda:0") == ("cpu", torch.uint8)
    assert loader_placement(cfg, "cpu") == ("cpu", torch.float32)          # a CPU run keeps the float view
    assert loader_placement(replace(cfg, loader_device="cpu"), "cpu") == ("cpu", torch.uint8)
    with pytest.raises(RunError, match="--loader-device gpu"):
        loader_placement(replace(cfg, loader_device="gpu"), "cpu")


def test_a_run_with_the_cpu_loader_trains_and_evaluates(sample_records, tmp_path):
    out = tmp_path / "run"
    rc = main(["--records", str(sample_records), "--gpus", "", "--towers", "1", "--batch-size", "4",
               "--no-progress", "--out", str(out), "--epochs", "1", "--epoch-steps", "2",
               "--loader-device", "cpu", "--channels-last"])
    assert rc == 0
    m = json.loads((out / "metrics.jsonl").read_text())
    assert m["step"] == 2 and m["train_images"] == 8 and m["amp_skipped"] == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["center"]["images"] > 0 and ev["tencrop"]["images"] == ev["center"]["images"]
    assert json.loads((out / "config.json").read_text())["loader_device"] == "cpu"
