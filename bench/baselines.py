"""The loaders ``bench.loaders`` compares ours against, each making the same training view.

The training view is the paper's: a random 224×224 window of the 256×256 image (integer
offsets 0..32 on each axis, no resampling), a left-right mirror with probability 1/2, PCA
lighting (RGB shift ``eigvec @ (alpha * eigval / 255)``, alpha ~ N(0, 0.1)) and the per-channel
mean subtracted; float32, (B, 3, 224, 224) contiguous NCHW, 0–255 scale (NOT divided by std).

- ``torch_loader``: ``torch.utils.data.DataLoader`` over the tar shards (random access
  through the DALI index files), PIL decode and numpy view with ``pipeline.reference``'s
  draws and arithmetic, ``num_workers`` processes, default collate.
- ``ffcv_loader``: FFCV 1.0.2 over ``train.beton``. FFCV has no fixed-size random crop and
  no PCA lighting: the crop is ``RandomResizedCropRGBImageDecoder`` with scale = ratio = 1
  pinned to (224/256)², which draws exactly a 224×224 window at a uniform integer offset and
  "resizes" it 224 -> 224 (OpenCV copies when sizes match: no resampling); lighting + mean +
  HWC->CHW float is ``LightingToCHW``, a numba Operation of ours (FFCV's own NormalizeImage
  can subtract a mean but cannot add a per-image random shift).
- ``dali_decode_loader`` / ``ffcv_decode_loader``: the floors — the same JPEGs read and
  decoded to uint8 HWC batches and nothing else (DALI's CPU or mixed decoder; FFCV's
  SimpleRGBImageDecoder on the beton's JPEGs).

    from bench.baselines import torch_loader
    for images, labels in torch_loader("data/records", batch_size=128, workers=2, stats=stats):
        ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from pipeline import reference as ref
from records.index import read_index


# ----------------------------------------------------------------------------- records access

@dataclass(frozen=True)
class Sample:
    """Where one record's JPEG and label live inside a tar shard (byte offsets)."""
    tar: str
    jpg_offset: int
    jpg_size: int
    cls_offset: int
    cls_size: int


def shard_samples(tar: Path, idx: Path) -> list[Sample]:
    """Where each record of one shard lives: its index read (and checked against the tar) by
    records.index, the one parser of the format."""
    index = read_index(tar, idx)
    return [Sample(str(tar), int(jo), int(js), int(co), int(cs))
            for (jo, js), (co, cs) in zip(index.jpg.tolist(), index.cls.tolist())]


def crop_view(img: np.ndarray, draw: ref.TrainDraw, shift: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``ref.train_view`` for a per-channel ``mean``, done the way a careful DataLoader user
    would: cut the window first (224², not 256² pixels of arithmetic) and compute in CHW,
    so numpy's inner loops run along rows, not over 3 channels. Same float32 operations in
    the same order, so the result is bit-identical to the reference."""
    patch = img[draw.y:draw.y + ref.CROP, draw.x:draw.x + ref.CROP]
    if draw.flip:
        patch = patch[:, ::-1]
    out = np.empty((3, ref.CROP, ref.CROP), np.float32)
    np.subtract(patch.transpose(2, 0, 1), np.asarray(mean, np.float32)[:, None, None], out=out)
    out += np.asarray(shift, np.float32)[:, None, None]
    return out


class RecordsTrainSet(torch.utils.data.Dataset):
    """Map-style dataset over the train shards: PIL decode + the paper's view, 0–255 scale."""

    def __init__(self, samples: list[Sample], stats, seed: int = 0):
        self.samples = samples
        self.mean = np.asarray(stats.mean, np.float32)          # per-channel, 0–255
        self.eigval = np.asarray(stats.eigval, np.float64)
        self.eigvec = np.asarray(stats.eigvec, np.float64)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._files: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: str, offset: int, size: int) -> bytes:
        fd = self._files.get(path)
        if fd is None:                       # one descriptor per shard per worker process
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = ref.decode(self._read(s.tar, s.jpg_offset, s.jpg_size))
        label = int(self._read(s.tar, s.cls_offset, s.cls_size).decode("ascii"))
        d = ref.draw(self.rng)
        shift = ref.lighting_shift(d.alpha, self.eigval, self.eigvec)
        return crop_view(img, d, shift, self.mean), label


def _seed_worker(worker_id: int) -> None:
    """Give each worker process its own random stream (forked copies would repeat draws)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng([info.dataset.seed, worker_id, info.seed % 2**32])


def torch_loader(shards: list[tuple[Path, Path]], stats, batch_size: int, workers: int,
                 device: str = "cpu", seed: int = 0) -> torch.utils.data.DataLoader:
    """A plain PyTorch DataLoader: shuffled, ``workers`` processes, pinned memory only for
    CUDA (the caller moves batches with ``non_blocking=True``), last partial batch dropped."""
    samples = [s for tar, idx in shards for s in shard_samples(tar, idx)]
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        RecordsTrainSet(samples, stats, seed), batch_size=batch_size, shuffle=True,
        num_workers=workers, pin_memory=device.startswith("cuda"), drop_last=True,
        persistent_workers=workers > 0, worker_init_fn=_seed_worker if workers > 0 else None,
        generator=gen)


# ----------------------------------------------------------------------------- DALI decode floor

class DaliDecodeLoader:
    """The floor: DALI reads the same shards and decodes the JPEGs, nothing else.

    ``graphs.build_decode_only``: the train view's reader (a new order every epoch, full
    batches), executor, prefetch depth and decoder per device, minus every op after the
    decoder. Yields (uint8 (B, 256, 256, 3) HWC images, None), zero-copy torch tensors on
    ``device``; the decoder is "cpu" (libjpeg-turbo) on CPU, "mixed" (nvJPEG) for CUDA.
    ``decode="window"``: only the train view's 224×224 windows, (B, 224, 224, 3), drawn as
    the train view draws them; "none": the feed alone, the batch's JPEG bytes as DALI's
    TensorList (ragged: no tensor)."""

    def __init__(self, shards: list[tuple[Path, Path]], batch_size: int, threads: int,
                 device: str = "cpu", seed: int = 0, decode: str = "full"):
        from pipeline import graphs
        self.device, self.decode = torch.device(device), decode
        spec = graphs.GraphSpec(files=tuple((str(t), str(i)) for t, i in shards), view="train",
                                batch_size=batch_size, seed=seed, shuffle=True, num_threads=threads)
        feed = graphs.default_feed(spec, draws=decode == "window", drop_last=True)   # as the train view
        self._len = feed.plan.batches
        self.pipe = graphs.build_decode_only(spec, graphs.DeviceSettings.for_device(self.device),
                                             feed, decode)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, None]]:
        from pipeline.loader import from_dali
        for _ in range(self._len):      # a continuous shuffled stream; an epoch = len batches
            (images,) = self.pipe.run()
            yield (images if self.decode == "none" else from_dali(images, self.device)), None


# ----------------------------------------------------------------------------- FFCV

def _beton_fields(beton: Path) -> tuple[str, str]:
    """The names of the beton's RGB image field and integer label field."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    handlers = Reader(str(beton)).handlers
    image = [n for n, h in handlers.items() if isinstance(h, RGBImageField)]
    label = [n for n, h in handlers.items() if isinstance(h, IntField)]
    if len(image) != 1 or len(label) != 1:
        raise ValueError(f"{beton}: expected one RGB image field and one int field, got {list(handlers)}")
    return image[0], label[0]


def lighting_matrix(stats) -> np.ndarray:
    """(3, 3) float64 L with ``L @ alpha == ref.lighting_shift(alpha, eigval, eigvec)``:
    the shift is linear in alpha, so column k is the reference's shift for alpha = e_k.
    Deriving it from the reference keeps FFCV's lighting whatever the reference's scale."""
    return np.stack([ref.lighting_shift(np.eye(3)[k], stats.eigval, stats.eigvec) for k in range(3)], axis=1)


def light_one(image: np.ndarray, out: np.ndarray, alpha: np.ndarray, lmat: np.ndarray,
              mean: np.ndarray) -> None:
    """One image, uint8 (H, W, 3) -> float32 (3, H, W) in ``out``:
    ``(x - mean) + lmat @ alpha``, 0–255 scale, in the reference's order of float32
    operations (shift computed in float64, then rounded, like ``ref.train_view``).
    Plain Python that numba compiles; tested against ``ref.train_view``."""
    h, w, _ = image.shape
    for c in range(3):
        acc = 0.0
        for k in range(3):
            acc += lmat[c, k] * alpha[k]
        s = np.float32(acc)
        m = mean[c]
        for y in range(h):
            for x in range(w):
                out[c, y, x] = (np.float32(image[y, x, c]) - m) + s


def make_lighting_op(stats):
    """FFCV Operation: PCA lighting (alpha ~ N(0, 0.1) per image) + mean subtraction +
    HWC uint8 -> CHW float32, fused into one numba pass over each image. Built lazily so
    importing this module never needs FFCV or numba."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from numba import njit

    lmat = lighting_matrix(stats)
    mean = np.asarray(stats.mean, np.float32)            # per-channel, 0–255
    std = ref.LIGHTING_STD
    # Compiled on its own, without FFCV's fastmath, so float32 rounding matches the reference.
    one = njit(nogil=True)(light_one) if Compiler.is_enabled else light_one

    class LightingToCHW(Operation):
        def generate_code(self) -> Callable:
            my_range = Compiler.get_iterator()

            def lighting(images, dst):
                n = images.shape[0]
                alpha = np.random.normal(0.0, std, (n, 3))
                for i in my_range(n):
                    one(images[i], dst[i], alpha[i], lmat, mean)
                return dst[:n]
            lighting.is_parallel = True
            return lighting

        def declare_state_and_memory(self, previous_state):
            h, w, c = previous_state.shape
            return (replace(previous_state, jit_mode=True, shape=(c, h, w), dtype=np.dtype("float32")),
                    AllocationQuery((c, h, w), np.dtype("float32")))

    return LightingToCHW()


def _ffcv_order():
    from ffcv.loader import OrderOption
    return OrderOption.RANDOM


def ffcv_loader(beton: Path, stats, batch_size: int, workers: int, device: str = "cpu", seed: int = 0):
    """FFCV's closest pipeline to the paper's view (module docstring says where it differs)."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor
    image_field, label_field = _beton_fields(beton)
    area = (ref.CROP / ref.SIZE) ** 2           # 49/64: exactly a 224×224 window of 256×256
    image = [RandomResizedCropRGBImageDecoder((ref.CROP, ref.CROP), scale=(area, area), ratio=(1.0, 1.0)),
             RandomHorizontalFlip(), make_lighting_op(stats), ToTensor()]
    label = [IntDecoder(), ToTensor(), Squeeze()]
    if device.startswith("cuda"):
        image.append(ToDevice(torch.device(device), non_blocking=True))
        label.append(ToDevice(torch.device(device), non_blocking=True))
    return Loader(str(beton), batch_size=batch_size, num_workers=workers, order=_ffcv_order(),
                  os_cache=True, drop_last=True, distributed=False, seed=seed,
                  pipelines={image_field: image, label_field: label})


def ffcv_decode_loader(beton: Path, batch_size: int, workers: int, device: str = "cpu", seed: int = 0):
    """FFCV's floor: its JPEG decoder only, uint8 (B, 256, 256, 3) HWC; labels not read."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import ToDevice, ToTensor
    image_field, label_field = _beton_fields(beton)
    image = [SimpleRGBImageDecoder(), ToTensor()]
    if device.startswith("cuda"):
        image.append(ToDevice(torch.device(device), non_blocking=True))
    return Loader(str(beton), batch_size=batch_size, num_workers=workers, order=_ffcv_order(),
                  os_cache=True, drop_last=True, distributed=False, seed=seed,
                  pipelines={image_field: image, label_field: None})


def tensor_pair(batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(images, labels) from whatever a loader yields: a pair, or FFCV's one-field tuple."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None
