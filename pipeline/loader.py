"""``Loader``: the records, through a DALI graph, as (images, labels) torch tensors on a device.

    from pipeline import Loader
    train = Loader("data/records", split="train", view="train", batch_size=128, device="cuda:0")
    for images, labels in train:       # one epoch; images (128, 3, 224, 224) float, 0–255 minus mean
        ...
    val = Loader("data/records", split="val", view="tencrop", batch_size=32, shard=(rank, world))
    len(val), val.epoch_size, val.num_classes
    for images, labels in train.iter_epoch(5, start=300):   # epoch 5 from batch 300, resuming
        ...

Every argument is checked (and the records' meta/stats/index files read) before a DALI
graph is built, so bad input fails with one line: ``LoaderError`` for arguments,
``records.format.RecordsError`` for the records folder (each shard's index is checked against
its tar). A record that fails to decode during an epoch raises one ``RecordsError`` naming
its shard and key.

``dtype=torch.uint8``: the loader only cuts (no mirror); it yields ``(U8Batch, labels)`` and
``pipeline.finish`` mirrors and makes the float images on the device (pipeline/finish.py has the contract).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError, at_least
from common.devices import parse_device
from common.errors import DeviceError
from common.system import usable_cores
from pipeline import graphs, reader, reference as ref
from pipeline.errors import LoaderError
from pipeline.finish import U8Batch, fixed_windows
from pipeline.kernels import KERNELS
from records.folder import read_mean_image, read_meta, read_stats, shard_paths
from records.format import RecordsError, build_command

SPLITS = ("train", "val")
MEANS = ("channel", "pixel")


@dataclass(frozen=True)
class LoaderOptions:
    """Knobs beyond the loader contract, for tests and experiments; defaults = the paper."""
    lighting_std: float = ref.LIGHTING_STD   # alpha ~ N(0, this) in the train view; 0 = off
    subtract_mean: bool = True   # False: raw 0–255 pixels (tests find the crop window in them)
    with_draws: bool = False     # yield (images, labels, Draws): record keys + random draws
    # the CPU float32 train view's mirror+mean+cast: "dali" (crop_mirror_normalize) or "numba"
    # (pipeline/kernels.py: the same bits, less CPU, a numba compile per process)
    kernel: str = "dali"

    def __post_init__(self):
        if not self.lighting_std >= 0:
            raise LoaderError("LoaderOptions: lighting_std must be >= 0")
        if self.kernel not in KERNELS:
            raise LoaderError(f"LoaderOptions: kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")


@dataclass(frozen=True)
class Draws:
    """What went into one batch: record keys and, for the train view, the random draws."""
    keys: list[str]              # the records' keys (``<key>.jpg``), batch order
    y: np.ndarray | None         # window top offsets, 0..32 (train view only)
    x: np.ndarray | None         # window left offsets, 0..32
    mirror: np.ndarray | None    # 1 = mirrored left-right
    alpha: np.ndarray | None     # (n, 3) lighting coefficients


class Loader:
    """Iterable of (images, labels); each ``iter()`` is one epoch of this rank's records.

    images: float32/float16 on ``device``, (B, 3, 224, 224) — (B, 10, 3, 224, 224) for
    "tencrop" — on the 0–255 scale minus the mean (not divided by std); labels: int64 (B,).
    Val views ("center", "tencrop") see each record of the split exactly once per epoch
    across all ranks, in file order (the last batch may be partial). "train" reads a new
    random permutation of the whole split every epoch — a function of (seed, epoch), the same
    on every rank, each rank reading its disjoint 1/world of it — and, by default, drops the
    last partial batch, giving every rank the same number of batches.

    records: the folder prep/build_records.py wrote. shard: (rank, world) — rank r reads its
    own 1/world of the split. seed: with the epoch, fixes the order; with the epoch, rank and
    batch, every random draw. epoch: the epoch the first ``iter()`` reads (each ``iter()``
    reads the next one; ``iter_epoch`` picks one and a first batch). mean: "channel"
    (stats.json's RGB mean) or "pixel" (mean_image.npy, the paper's option). num_threads:
    DALI CPU threads; default: every core this process may use (``usable_cores``; a
    launcher running several ranks per node passes its share). drop_last: default True
    for the train view, False for the val views. options: LoaderOptions (tests, experiments).
    """

    def __init__(self, records, split: str = "train", view: str = "train", batch_size: int = 128,
                 device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1), seed: int = 0,
                 dtype: torch.dtype = torch.float32, mean: str = "channel",
                 num_threads: int | None = None, drop_last: bool | None = None,
                 options: LoaderOptions = LoaderOptions(), epoch: int = 0):
        _check_args(split, view, mean, dtype, batch_size, num_threads)
        rank, world = _check_shard(shard)
        try:
            at_least("epoch", epoch, 0)
            at_least("seed", seed, 0)
        except ConfigError as exc:
            raise LoaderError(str(exc)) from None
        self.device = _parse_device(device)
        self.drop_last = (view == "train") if drop_last is None else bool(drop_last)
        self.options = options
        self._records = records = Path(records)
        meta, stats, files = read_meta(records), read_stats(records), shard_paths(records, split)
        total = _split_count(records, meta, split)
        self.num_classes = len(meta["classes"])
        self._repair = (build_command(str(records), meta["source"], meta["params"], "--repair")
                        if "source" in meta and "params" in meta else "the build command plus --repair")
        self._plan_epoch(total, rank, world, batch_size)
        table = reader.RecordTable(files)       # every index checked against its tar
        reader.check_count(table, total, records / "meta.json")
        self.spec = graphs.GraphSpec(
            files=tuple((str(t), str(i)) for t, i in files), view=view, batch_size=batch_size,
            shard=(rank, world), seed=int(seed), dtype=dtype, **_mean_fields(records, stats, mean, options),
            eigval=tuple(float(v) for v in stats.eigval),
            eigvec=tuple(float(v) for v in np.asarray(stats.eigvec).ravel()),
            lighting_std=options.lighting_std if view == "train" else 0.0,
            shuffle=view == "train",
            num_threads=num_threads or usable_cores(),
            extras=options.with_draws, kernel=options.kernel)
        plan = reader.Plan(total=total, rank=rank, world=world, batch_size=batch_size,
                           batches=self._len, seed=int(seed), shuffle=self.spec.shuffle)
        self._feed = reader.Feed(table, plan, self.spec.lighting_std if view == "train" else None,
                                 epoch=epoch)
        self.epoch = epoch          # the epoch the next iter() reads
        self.settings = graphs.DeviceSettings.for_device(self.device)
        self._pipe = graphs.build(self.spec, self.settings, self._feed)
        self._failed: RecordsError | None = None
        self._mean_image = _u8_mean_image(self.spec, self.device)

    def _plan_epoch(self, total: int, rank: int, world: int, batch: int) -> None:
        """Batches and records per epoch for this rank.

        Rank r reads positions [total*r//world, total*(r+1)//world) of the epoch's order.
        drop_last: every rank yields the same number of full batches (distributed training
        needs that), (total // world) // batch, and reads nothing else; else ceil(part / batch)
        batches, the last one holding what is left."""
        start, end = graphs.shard_range(total, rank, world)
        self._part = end - start
        self._len = (total // world) // batch if self.drop_last else math.ceil(self._part / batch)
        self.epoch_size = self._len * batch if self.drop_last else self._part
        if self._len == 0:
            raise LoaderError(f"batch_size={batch} leaves no batch: rank {rank} of {world} sees "
                              f"{self._part} records; use a smaller batch_size")

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, start: int = 0):
        """Batches ``start``, ``start`` + 1, ... of epoch ``epoch``: exactly those batches of an
        uninterrupted epoch (records and random draws), without reading or decoding the ones
        before ``start``. Afterwards ``self.epoch`` is ``epoch + 1``."""
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(start, int)
                and 0 <= start <= self._len):
            raise LoaderError(f"iter_epoch needs epoch >= 0 and 0 <= start <= {self._len}, "
                              f"got epoch={epoch!r}, start={start!r}")
        self.epoch = epoch + 1
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int):
        if self._failed is not None:
            raise self._failed
        self._position(epoch, start)
        for _ in range(start, self._len):
            outputs, batch = self._run()
            yield self._to_torch(outputs, len(batch.records), batch)

    def _position(self, epoch: int, start: int) -> None:
        """Make DALI's next run return batch ``start`` of ``epoch``. Batches DALI has already
        been given (prefetched) are kept if they are the ones wanted, else run out and dropped
        (at most the prefetch depth: an abandoned epoch or a jump)."""
        if self._feed.next_position() == (epoch, start):
            return
        stale = len(self._feed.fed)
        self._feed.seek(epoch, start)      # DALI asks for the batches after the stale ones
        for _ in range(stale):
            self._run()

    def _run(self):
        """One pipeline run: (outputs, the reader.Batch they hold). A DALI failure becomes one
        RecordsError naming the culprits; the Loader is unusable afterwards."""
        try:
            outputs = self._pipe.run()
        except RecordsError as exc:   # the feed's check of the bytes it hands DALI names the record
            self._failed = RecordsError(f"{exc}; {self._hint()}")
            raise self._failed from None
        except Exception as exc:    # DALI raises RuntimeError (nvImageCodec...) naming nothing
            self._failed = self._records_error(exc)
            raise self._failed from None
        return outputs, self._feed.fed.popleft()

    def _records_error(self, exc: Exception) -> RecordsError:
        """The shard and key of what made DALI fail, found by decoding with PIL the batches
        DALI held (the failed one and those prefetched); the hint says what to do."""
        bad = reader.undecodable(self._feed.table, list(self._feed.fed))
        hint = self._hint()
        if not bad:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return RecordsError(f"{self._records}: the pipeline failed on a batch ({first}) but "
                                f"every record of it decodes with PIL; {hint}")
        tar, key, why = bad[0]
        more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
        return RecordsError(f"{tar}: record {key}: {why}{more}; {hint}")

    def _hint(self) -> str:
        return f"run python -m prep.verify {self._records}, repair the records ({self._repair}), then resume"

    def _to_torch(self, outputs, n: int, batch):
        """The first n samples as torch tensors on self.device; no host round trip on a GPU.

        DALI's dynamic executor hands the output buffer over to Python, so the DLPack view
        stays valid after later runs (zero-copy on CPU and GPU)."""
        images = from_dali(outputs[0], self.device)[:n]
        labels = self._feed.table.labels(batch.records)      # RecordsError names a bad .cls
        if labels.size and int(labels.max()) >= self.num_classes:
            r = batch.records[int(np.argmax(labels))]
            raise RecordsError(f"{self._feed.table.where(r)}: record {self._feed.table.key(r)}: "
                               f"label {int(labels.max())} is outside 0..{self.num_classes - 1} "
                               f"({self._records / 'meta.json'} lists {self.num_classes} classes)")
        labels = torch.from_numpy(labels).to(self.device, non_blocking=True)
        if self.spec.dtype == torch.uint8:
            images = self._u8_batch(images, outputs, n)
        if self.options.with_draws:
            return images, labels, _draws(outputs[1 + graphs.u8_outputs(self.spec):], n,
                                          [self._feed.table.key(r) for r in batch.records])
        return images, labels

    # ---- uint8 views: what pipeline.finish needs besides the pixels ----------------------

    def _u8_batch(self, pixels: torch.Tensor, outputs, n: int) -> U8Batch:
        """The train view's per-sample mean and window come out of the graph; the val views'
        are the same for every sample (the channel mean; the fixed crops)."""
        if graphs.u8_outputs(self.spec):
            mean = from_dali(outputs[1], self.device)[:n]
            window = from_dali(outputs[2], self.device)[:n].long()
        else:
            mean = torch.tensor(self.spec.channel_mean, dtype=torch.float32).expand(n, 3)
            fixed = fixed_windows(self.spec.view)
            window = fixed.expand(n, *fixed.shape)
        return U8Batch(pixels, mean, window, self._mean_image)

    def __repr__(self) -> str:
        s = self.spec
        return (f"Loader(view={s.view!r}, batch_size={s.batch_size}, device={str(self.device)!r}, "
                f"shard={s.shard}, batches={self._len}, epoch_size={self.epoch_size})")


def from_dali(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI batch as a torch tensor, zero-copy. On a GPU, DLPack makes torch's current
    stream on ``device`` wait for DALI's work (as DALI's own PyTorch plugin does)."""
    if device.type != "cuda":
        return torch.from_dlpack(tensor_list.as_tensor())
    with torch.cuda.device(device):
        return torch.from_dlpack(tensor_list.as_tensor())


def _draws(extras, n: int, keys: list[str]) -> Draws:
    """extras = (jpegs[, window (y, x, mirror), alpha]) as built by graphs.build(extras=True)."""
    if len(extras) == 1:
        return Draws(keys, None, None, None, None)
    window, alpha = (np.stack([np.asarray(t[i]) for i in range(n)]) for t in extras[1:])
    return Draws(keys, window[:, 0], window[:, 1], window[:, 2], alpha)


def _check_args(split, view, mean, dtype, batch_size, num_threads) -> None:
    _check_choice("split", split, SPLITS)
    _check_choice("view", view, graphs.VIEWS)
    _check_choice("mean", mean, MEANS)
    if dtype not in graphs.DTYPES:
        raise LoaderError(f"dtype must be torch.float32, torch.float16 or torch.uint8, got {dtype}")
    try:
        at_least("batch_size", batch_size)
        if num_threads is not None:
            at_least("num_threads", num_threads)
    except ConfigError as exc:
        raise LoaderError(str(exc)) from None


def _u8_mean_image(spec: graphs.GraphSpec, device: torch.device) -> torch.Tensor | None:
    """The per-pixel mean image for ``finish`` (uint8 views with mean="pixel"), on the device
    once, so batches only carry a reference to it."""
    if spec.dtype != torch.uint8 or spec.mean_image is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(spec.mean_image, np.float32)).to(device)


def _mean_fields(records: Path, stats, mean: str, options: LoaderOptions) -> dict:
    """GraphSpec's channel_mean / mean_image for mean="channel" | "pixel" (0–255 scale)."""
    if not options.subtract_mean:
        return {"channel_mean": (0.0, 0.0, 0.0), "mean_image": None}
    if mean == "pixel":   # the image is centred before the crop; nothing left per channel
        return {"channel_mean": (0.0, 0.0, 0.0), "mean_image": _read_mean_image(records)}
    return {"channel_mean": tuple(float(v) for v in stats.mean), "mean_image": None}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise LoaderError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_shard(shard) -> tuple[int, int]:
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise LoaderError(f"shard must be (rank, world), got {shard!r}") from None
    if not (world >= 1 and 0 <= rank < world):
        raise LoaderError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    return rank, world


def _parse_device(device) -> torch.device:
    """common.devices.parse_device, as a LoaderError; DALI hands batches to the CPU or CUDA only."""
    try:
        dev = parse_device(device)
    except DeviceError as exc:
        raise LoaderError(str(exc)) from None
    if dev.type not in ("cpu", "cuda"):
        raise LoaderError(f"device {device!r}: only 'cpu' and 'cuda:N' are supported")
    return dev


def _split_count(records: Path, meta: dict, split: str) -> int:
    try:
        total = int(meta["counts"][split])
        meta["classes"][0]
    except (KeyError, TypeError, ValueError, IndexError):
        raise RecordsError(f"{records / 'meta.json'}: needs counts.{split} and a non-empty "
                           "classes list") from None
    if total < 1:
        raise RecordsError(f"{records / 'meta.json'}: split {split!r} has no records")
    return total


def _read_mean_image(records: Path) -> np.ndarray:
    """The paper's per-pixel mean image, (256, 256, 3) float32, 0–255 scale."""
    image = read_mean_image(records)
    if image.shape != (ref.SIZE, ref.SIZE, 3) or not np.isfinite(image).all():
        raise RecordsError(f"{records / 'mean_image.npy'}: expected finite values of shape "
                           f"(256, 256, 3), got {image.shape}")
    return image.astype(np.float32)
