"""The uint8 views: the loader only cuts, ``pipeline.finish`` mirrors and subtracts lighting and
mean on the device; together they must give the float view (same seed) up to float rounding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Loader, LoaderError, LoaderOptions, U8Batch, finish
from pipeline import reference as ref
from pipeline.finish import mirrored
from records.folder import read_stats, shard_paths

DRAWS = LoaderOptions(with_draws=True)


@pytest.fixture(scope="module")
def records(sample_records) -> Path:
    return Path(sample_records)


def first_pair(records, view: str, mean: str, dtype=torch.float32, batch_size=8):
    """The first batch of the float Loader and of the uint8 Loader, same arguments and seed."""
    kwargs = dict(split="train" if view == "train" else "val", view=view, batch_size=batch_size,
                  mean=mean, seed=5, num_threads=1, options=DRAWS)
    floats = next(iter(Loader(records, dtype=dtype, **kwargs)))
    u8 = next(iter(Loader(records, dtype=torch.uint8, **kwargs)))
    return floats, u8


@pytest.mark.parametrize("view,mean", [("train", "channel"), ("train", "pixel"), ("center", "channel"),
                                       ("center", "pixel"), ("tencrop", "channel"), ("tencrop", "pixel")])
def test_uint8_view_plus_finish_equals_the_float_view(records, view, mean):
    (want, labels, draws), (batch, labels8, draws8) = first_pair(records, view, mean)
    assert isinstance(batch, U8Batch) and batch.pixels.dtype == torch.uint8
    crops = (10,) if view == "tencrop" else ()
    assert batch.pixels.shape == (8, *crops, 224, 224, 3) and batch.mean.shape == (8, 3)
    assert torch.equal(labels, labels8) and draws.keys == draws8.keys
    if view == "train":   # the same draws, so the same windows, mirrors and lighting
        assert np.array_equal(draws.mirror, draws8.mirror) and np.allclose(draws.alpha, draws8.alpha)
        assert set(draws.mirror.tolist()) == {0, 1}   # both mirror paths of the mean window ran
    got = finish(batch)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-3     # 0–255 levels
    assert want.abs().max().item() > 50               # not a trivial all-zero comparison
    contiguous = finish(batch, channels_last=False)
    assert contiguous.is_contiguous() and torch.equal(contiguous, got)
    if view != "tencrop":   # the NCHW view of the NHWC buffer: channels_last, no copy
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_uint8_pixels_are_exact_unmirrored_windows_of_the_decoded_image(records):
    """Independent of the float view: each uint8 patch is the decoded JPEG's 224 window at
    the drawn offsets, NOT mirrored (numpy/PIL decode, the reference); the window carries the
    drawn mirror, and ``mirrored`` turns the patches into the view's."""
    images = {key: ref.decode(jpeg) for tar, _ in shard_paths(records, "train")
              for key, jpeg, _ in ref.iter_tar(tar)}
    loader = Loader(records, split="train", view="train", batch_size=8, dtype=torch.uint8,
                    num_threads=1, options=LoaderOptions(with_draws=True))
    batch, _, d = next(iter(loader))
    assert set(d.mirror.tolist()) == {0, 1}
    flipped = mirrored(batch.pixels, batch.window[:, 2]).numpy()
    for patch, view, key, y, x, flip, win in zip(batch.pixels.numpy(), flipped, d.keys, d.y, d.x,
                                                 d.mirror, batch.window):
        window = images[key][y:y + ref.CROP, x:x + ref.CROP]
        np.testing.assert_array_equal(patch, window)
        np.testing.assert_array_equal(view, window[:, ::-1] if flip else window)
        assert win.tolist() == [y, x, flip]


def test_finished_photos_equal_the_float_view_and_the_reference_mirror_included(photo_records):
    """Real photos: finish(uint8 train batch) is the float view bit for bit (mean="channel"),
    and each sample, mirrored ones included, is the reference's view of the PIL-decoded photo."""
    images = {key: ref.decode(jpeg) for tar, _ in shard_paths(photo_records, "train")
              for key, jpeg, _ in ref.iter_tar(tar)}
    stats = read_stats(photo_records)
    kwargs = dict(split="train", view="train", batch_size=12, seed=3, num_threads=1, options=DRAWS)
    want, _, _ = next(iter(Loader(photo_records, **kwargs)))
    batch, _, d = next(iter(Loader(photo_records, dtype=torch.uint8, **kwargs)))
    got = finish(batch, channels_last=False)
    assert torch.equal(got, want) and set(d.mirror.tolist()) == {0, 1}
    for image, key, y, x, flip, alpha in zip(got.numpy(), d.keys, d.y, d.x, d.mirror, d.alpha):
        view = ref.train_view(images[key], y, x, bool(flip), alpha, stats, stats.mean)
        np.testing.assert_allclose(image, view, atol=1e-3, rtol=0)
        if flip:   # a mirror of a photo is not the photo: the comparison can see it
            assert np.abs(view - view[:, :, ::-1]).max() > 20


def test_finish_mirrors_each_crop_as_its_window_says():
    """Hand-made pixels (value = column + channel): output column j of a mirrored crop is
    pixel column 223 - j, of an unmirrored one column j; for 4-D and 10-crop 5-D batches."""
    cols = torch.arange(224).view(1, 224, 1) + torch.tensor([0, 10, 20])   # (1, 224, 3)
    one = (cols % 256).to(torch.uint8).expand(224, 224, 3)
    for lead, flags in (((2,), [[0], [1]]), ((2, 3), [[0, 1, 1], [1, 0, 0]])):
        pixels = one.expand(*lead, 224, 224, 3).contiguous()
        flip = torch.tensor(flags).view(*lead)
        window = torch.stack([torch.zeros_like(flip), torch.zeros_like(flip), flip], -1)
        mean = torch.tensor([[1.0, 2.0, 3.0]] * lead[0])
        for channels_last in (True, False):
            out = finish(U8Batch(pixels, mean, window), channels_last=channels_last)
            for index in np.ndindex(*lead):
                j = torch.arange(224)
                source = 223 - j if flip[index] else j
                want = (one[:, source].float() - mean[index[0]]).movedim(-1, 0)
                assert torch.equal(out[index], want), (index, channels_last)
        assert torch.equal(mirrored(pixels, flip)[flip.bool()], pixels[flip.bool()].flip(-2))
        assert torch.equal(mirrored(pixels, flip)[~flip.bool()], pixels[~flip.bool()])


def test_finish_half_precision_matches_the_float16_view(records):
    (want, _, _), (batch, _, _) = first_pair(records, "train", "channel", dtype=torch.float16)
    got = finish(batch, dtype=torch.float16)
    assert got.dtype == torch.float16
    # one rounding of the same float32 value in both: equal, but allow one fp16 step (0.125)
    assert (got.float() - want.float()).abs().max().item() <= 0.125


def test_finish_mean_windows_follow_the_mirror():
    """Per-pixel mean with a hand-made mean image: column j of a mirrored crop is centred by
    column x + 223 - j of the mean image."""
    mean_image = torch.arange(256 * 256 * 3, dtype=torch.float32).view(256, 256, 3)
    pixels = torch.full((2, 224, 224, 3), 200, dtype=torch.uint8)
    window = torch.tensor([[3, 5, 0], [3, 5, 1]])
    out = finish(U8Batch(pixels, torch.tensor([[1.0, 2.0, 3.0]] * 2), window, mean_image),
                 channels_last=False)
    np.testing.assert_array_equal(out[0, 1, 0, 0].item(), 200 - mean_image[3, 5, 1].item() - 2)
    np.testing.assert_array_equal(out[1, 1, 0, 0].item(), 200 - mean_image[3, 5 + 223, 1].item() - 2)
    np.testing.assert_array_equal(out[1, 2, 10, 223].item(), 200 - mean_image[13, 5, 2].item() - 3)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_finish_rejects_non_float_output(dtype):
    batch = U8Batch(torch.zeros(1, 224, 224, 3, dtype=torch.uint8), torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(LoaderError, match="finish: dtype must be") as err:
        finish(batch, dtype=dtype)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("view,mean", [("train", "channel"), ("train", "pixel"), ("tencrop", "channel")])
def test_gpu_uint8_view_plus_finish_equals_the_float_view(records, view, mean):
    """The GPU graph (nvJPEG decode, GPU flip/crop): pixels stay on the GPU, finish runs there."""
    kwargs = dict(split="train" if view == "train" else "val", view=view, batch_size=8, mean=mean,
                  seed=5, num_threads=1, device="cuda:0")
    want, labels = next(iter(Loader(records, **kwargs)))
    batch, labels8 = next(iter(Loader(records, dtype=torch.uint8, **kwargs)))
    assert batch.pixels.device.type == "cuda" and torch.equal(labels, labels8)
    got = finish(batch, "cuda:0")
    assert got.device.type == "cuda" and (got - want).abs().max().item() < 1e-3
    assert torch.equal(finish(batch, "cuda:0", channels_last=False), got)

