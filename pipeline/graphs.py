"""The DALI graphs: the train view, the centre crop and the 10 crops, for CPU or GPU.

One function (``build``) builds all of them from a ``GraphSpec``; everything that differs
between a CPU and a GPU graph is in ``DeviceSettings``. ``Loader`` (pipeline/loader.py) is
the public way in (``LoaderOptions(with_draws=True)`` turns on ``GraphSpec.extras``, which
is how the tests see the random draws).

Pixels stay on the 0–255 scale: the model's input is the image minus the mean (per
channel, or the per-pixel mean image), NOT divided by std — the paper's input.

Train view, per image: a 224×224 window at integer offsets (y, x) drawn uniformly from
0..32, mirrored with p = 0.5, plus the paper's PCA lighting shift
``eigvec @ (alpha * eigval / 255)``, alpha ~ N(0, 0.1)³ (eigval is stats.json's, 0–255²;
see ``reference.lighting_magnitudes`` for the /255), minus the mean. Only the window is
decoded (``decoders.image_crop``: ROI decoding skips ~1/4 of the pixels and gives exactly
the pixels of a full decode cut afterwards). The lighting shift is the same RGB vector for
every pixel, so ``image + shift - mean`` is ``image - (mean - shift)``: it folds into
crop_mirror_normalize's per-sample ``mean`` argument, and mirror, lighting, mean, the
HWC->CHW layout and the cast are one fused op after the decoder. The per-sample draws
(offsets, coin, alpha) come from our reader (pipeline/reader.py: a function of seed, epoch,
rank and batch, so a Loader can start an epoch at any batch); alpha -> mean is computed by
a CPU operator; all are passed as argument inputs, also in a GPU graph.

Crop positions: DALI turns ``crop_pos_x`` p into the offset floor(p * (W - 224) + 0.5)
(checked empirically on DALI 2.4, for the ROI decoder and crop_mirror_normalize), so
p ~ U[0, 1] would give offsets 0 and 32 half the probability of the others. We draw the
integer k in 0..32 and pass p = k / 32 (exact in float32): every offset is equally likely
and equals the reference's integer offset.

Per-pixel mean (the paper's option): the 256×256 mean image is subtracted from the full
decoded image before any window is cut (one elementwise pass over 256² pixels), so it is
cut and mirrored with exactly the image's window; the channel part of the CMN mean is then
0. (The train view then decodes the whole image instead of the window.)

uint8 views (``GraphSpec.dtype == torch.uint8``): the graph only decodes and cuts the windows;
the pixels leave it as uint8 HWC, NOT mirrored, and the mirror and the lighting/mean
subtraction are left to ``pipeline.finish`` on the training device (docs/design.md), which
mirrors inside its elementwise pass: a separate flip in the graph would cost the loader one
more pass over every mirrored crop. The train view then also outputs,
per sample, the mean to subtract (channel mean minus the lighting shift, float32 (3,), 0–255)
and its window (y, x, mirror) (int32 (3,)), which ``finish`` needs for the per-pixel mean; the
per-pixel mean is never applied in the graph, so the train view always decodes only its window.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

from common.config import at_least
from pipeline import kernels, reader, reference as ref

VIEWS = ("train", "center", "tencrop")
DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.uint8: types.UINT8}


@dataclass(frozen=True)
class DeviceSettings:
    """Every CPU/GPU difference of the graphs, in one place."""
    device_id: int | None        # None: a CPU-only graph (no CUDA context at all)
    decoder: str                 # "cpu" or "mixed" (nvJPEG: host parse, GPU decode)
    prefetch_queue_depth: int    # batches prepared ahead of the consumer
    hw_decoder_load: float = 0.0  # share of JPEGs for the A100/H100 hardware decoder
    size_hint: int = ref.SIZE    # records are 256×256: preallocate decoder buffers for that

    @classmethod
    def for_device(cls, device: torch.device) -> "DeviceSettings":
        if device.type == "cuda":
            # hw_decoder_load 0.65: the default that DALI documents for decoders.image and
            # decoders.image_crop (its legacy nvJPEG decoder's, kept by the nvImageCodec
            # decoders; some nvImageCodec-based releases default to 0.9 instead). Spelled out
            # so that every DALI build splits the JPEGs alike. DALI's documentation: the best
            # share depends on the number of threads and is found by measuring (the loader
            # bench on the GPU), and it applies only where a hardware JPEG decoder exists
            # (A100, H100, H200; elsewhere the argument has no effect).
            # depth 3: AlexNet steps are short, so keep one more batch ready than on CPU.
            return cls(device_id=device.index or 0, decoder="mixed",
                       prefetch_queue_depth=3, hw_decoder_load=0.65)
        return cls(device_id=None, decoder="cpu", prefetch_queue_depth=2)

    @property
    def on_gpu(self) -> bool:
        return self.decoder == "mixed"

    def decoder_kwargs(self) -> dict:
        if not self.on_gpu:
            return {"device": "cpu"}
        return {"device": "mixed", "hw_decoder_load": self.hw_decoder_load,
                "preallocate_width_hint": self.size_hint,
                "preallocate_height_hint": self.size_hint}


@dataclass(frozen=True)
class GraphSpec:
    """What one graph reads and computes (built by Loader; tests build it directly)."""
    files: tuple[tuple[str, str], ...]   # (tar, idx) per shard, in order
    view: str                            # "train" | "center" | "tencrop"
    batch_size: int
    shard: tuple[int, int] = (0, 1)      # (rank, world): each rank reads its 1/world (pipeline/reader.py)
    seed: int = 0
    dtype: torch.dtype = torch.float32
    channel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)   # 0–255, subtracted per channel
    mean_image: np.ndarray | None = field(default=None, compare=False)  # (256,256,3) 0–255 or None
    eigval: tuple[float, ...] = (0.0, 0.0, 0.0)    # stats.json: variances, 0–255² units, descending
    eigvec: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)   # 3×3 row-major, column i = vector i
    lighting_std: float = ref.LIGHTING_STD   # alpha ~ N(0, this); 0 turns lighting off
    shuffle: bool = False                # a new random order every epoch (train); else file order
    num_threads: int = 2
    extras: bool = False                 # also output the JPEG bytes and the random draws
    kernel: str = "dali"                 # "numba": the CPU float32 train view uses pipeline/kernels.py

    def __post_init__(self):
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.uint8, got {self.dtype}")
        rank, world = self.shard
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {self.shard}")
        if self.kernel not in kernels.KERNELS:
            raise ValueError(f"kernel must be one of {kernels.KERNELS}, got {self.kernel!r}")
        at_least("batch_size", self.batch_size)
        at_least("num_threads", self.num_threads)


def build(spec: GraphSpec, dev: DeviceSettings, feed: reader.Feed | None = None) -> Pipeline:
    """A built DALI pipeline whose outputs are (images[, extras...]); the labels of a batch
    are the feed's (``Feed.fed`` knows its records; ``RecordTable.labels``), never DALI's.

    images: float (3,224,224) per sample, or (10,3,224,224) for "tencrop", 0–255 scale minus
    the mean. A uint8 spec: images are uint8 (224,224,3) HWC (or (10,224,224,3)), not
    mirrored, not centred, and ``u8_outputs(spec)`` more outputs follow (train: mean (3,) float32 and
    window (y, x, mirror) int32). With ``spec.extras``, last: the JPEG bytes, and for
    "train" also window (y, x, mirror) int32 (3,) and alpha float32 (3,).
    ``feed``: the batches to read (pipeline/reader.py); default: ``spec.files`` in file order,
    each epoch ``ceil(records / batch_size)`` batches, the last one partial.
    """
    pipe = _new_pipeline(spec, dev)
    with pipe:
        jpegs, *inputs = _reader(spec, feed or default_feed(spec))
        views, draws = _VIEW_BUILDERS[spec.view](jpegs, spec, dev, *inputs)
        extras = (jpegs, *draws) if spec.extras else ()
        pipe.set_outputs(views, *_u8_extras(spec, draws), *extras)
    pipe.build()
    return pipe


DECODE_FLOORS = ("full", "window", "none")


def build_decode_only(spec: GraphSpec, dev: DeviceSettings, feed: reader.Feed | None = None,
                      decode: str = "full") -> Pipeline:
    """The decode floor the benches compare the views with: the same reader, executor and
    decoder as ``build``, nothing after the decoder. ``decode``: "full" = whole images out
    (uint8 HWC); "window" = only the train view's 224×224 window, as ``build`` decodes it
    (the least any train view does; ``feed`` must carry the train draws); "none" = the JPEG
    bytes out undecoded (what the feed alone costs)."""
    if decode not in DECODE_FLOORS:
        raise ValueError(f"decode must be one of {DECODE_FLOORS}, got {decode!r}")
    pipe = _new_pipeline(spec, dev)
    with pipe:
        jpegs, *draws = _reader(spec, feed or default_feed(spec, draws=decode == "window"))
        if decode == "none":
            pipe.set_outputs(jpegs)
        elif decode == "window":
            off_y, off_x = draws[0][0], draws[0][1]
            window = (off_x / float(ref.MAX_OFFSET), off_y / float(ref.MAX_OFFSET))
            pipe.set_outputs(_decode(jpegs, spec, dev, window))
        else:
            pipe.set_outputs(_decode(jpegs, replace(spec, mean_image=None), dev))
    with warnings.catch_warnings():   # "window" leaves the feed's alpha unused, on purpose
        warnings.filterwarnings("ignore", message=".*but the outputs? at the ind")
        pipe.build()
    return pipe


def _new_pipeline(spec: GraphSpec, dev: DeviceSettings) -> Pipeline:
    return Pipeline(batch_size=spec.batch_size, num_threads=spec.num_threads,
                    device_id=dev.device_id, seed=_graph_seed(spec),
                    prefetch_queue_depth=dev.prefetch_queue_depth, exec_dynamic=True)


def _graph_seed(spec: GraphSpec) -> int:
    """Different ranks draw different augmentations; the same (seed, rank) repeats exactly."""
    rank, world = spec.shard
    return (spec.seed * 1_000_003 + rank) % (2 ** 31)


def default_feed(spec: GraphSpec, draws: bool = True, drop_last: bool = False) -> reader.Feed:
    """All of ``spec.files`` for ``spec.shard``, every batch (the last one partial), or with
    ``drop_last`` only full batches."""
    table = reader.RecordTable(spec.files)
    rank, world = spec.shard
    start, end = reader.shard_range(len(table), rank, world)
    part, size = end - start, spec.batch_size
    plan = reader.Plan(total=len(table), rank=rank, world=world, batch_size=size,
                       batches=part // size if drop_last else max(1, -(-part // size)),
                       seed=spec.seed, shuffle=spec.shuffle)
    lighting = spec.lighting_std if (draws and spec.view == "train") else None
    return reader.Feed(table, plan, lighting)


def _reader(spec: GraphSpec, feed: reader.Feed):
    """(jpegs[, window (y, x, mirror), alpha]) of the batch ``feed`` plans next: our reader
    (pipeline/reader.py) slices the records out of the tars by byte offset and computes the
    train view's draws; batches may be smaller than ``spec.batch_size`` (an epoch's last)."""
    dtypes = [types.UINT8]
    if feed.lighting_std is not None:
        dtypes += [types.INT32, types.FLOAT]
    return fn.external_source(source=feed, num_outputs=len(dtypes), batch=True, dtype=dtypes)


def u8_outputs(spec: GraphSpec) -> int:
    """How many outputs ``_u8_extras`` adds after the images."""
    return 2 if spec.dtype == torch.uint8 and spec.view == "train" else 0


def _u8_extras(spec: GraphSpec, draws) -> tuple:
    """uint8 train view: the per-sample mean (channel mean minus lighting, float32 (3,)) and
    window (y, x, mirror) (int32 (3,)) that ``pipeline.finish`` applies on the device."""
    if not u8_outputs(spec):
        return ()
    window, alpha = draws
    if spec.lighting_std > 0:
        mean = _lighting_mean(spec, alpha)   # the same op the float view feeds its CMN
    else:   # no lighting (alpha is zeros): the channel mean, per sample
        mean = alpha + types.Constant(np.asarray(spec.channel_mean, np.float32))
    return mean, window


def _decode(jpegs, spec: GraphSpec, dev: DeviceSettings, window=None):
    """uint8 HWC RGB. With ``window`` (crop_pos_x, crop_pos_y) only that 224×224 window is
    decoded (ROI decoding: ~1/4 fewer pixels; exactly the pixels of a full decode cut
    afterwards, which the tests check). Else the whole image, minus the mean image if any
    (float, 0–255), so any window cut from it later is centred by the same window of the mean."""
    if window is not None:
        return fn.decoders.image_crop(jpegs, crop=(ref.CROP, ref.CROP), crop_pos_x=window[0],
                                      crop_pos_y=window[1], output_type=types.RGB,
                                      **dev.decoder_kwargs())
    images = fn.decoders.image(jpegs, output_type=types.RGB, **dev.decoder_kwargs())
    if spec.mean_image is None or spec.dtype == torch.uint8:   # uint8: finish subtracts it
        return images
    mean_image = types.Constant(np.asarray(spec.mean_image, np.float32),
                                device="gpu" if dev.on_gpu else "cpu")
    return fn.reshape(images - mean_image, layout="HWC")


def _normalize(images, spec: GraphSpec, mirror, mean, window=None):
    """The one fused op: [window,] mirror, minus mean (lighting folded in), HWC->CHW, cast.
    uint8: [window] only, HWC kept, not mirrored (mirror and mean are ``pipeline.finish``'s
    job; ``mirror`` reaches it as the window's third value)."""
    crop = {} if window is None else {"crop": (ref.CROP, ref.CROP), "crop_pos_x": window[0],
                                      "crop_pos_y": window[1]}
    if spec.dtype == torch.uint8:
        if window is None:   # ROI-decoded already: nothing left to do here
            return images
        return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", **crop)
    return fn.crop_mirror_normalize(
        images, mirror=mirror, mean=mean, std=1.0,   # std 1: stay on the 0–255 scale
        dtype=DTYPES[spec.dtype], output_layout="CHW", **crop)


def _train_view(jpegs, spec: GraphSpec, dev: DeviceSettings, drawn_window, drawn_alpha):
    """The draws come from the reader (reader.draws: a function of seed, epoch, rank, batch):
    window (y, x, mirror) int32 (3,) and alpha (3,) per sample."""
    off_y, off_x, mirror = drawn_window[0], drawn_window[1], drawn_window[2]
    alpha = drawn_alpha if spec.lighting_std > 0 else None
    mean = _lighting_mean(spec, alpha)
    # k / 32 is exact in float32 and DALI rounds it back to exactly k (module docstring).
    window = (off_x / float(ref.MAX_OFFSET), off_y / float(ref.MAX_OFFSET))
    if spec.mean_image is None or spec.dtype == torch.uint8:   # decode only the window
        images = _decode(jpegs, spec, dev, window)
        if spec.kernel == "numba" and spec.dtype == torch.float32 and not dev.on_gpu:
            if not isinstance(mean, DataNode):   # no lighting: the channel mean, per sample
                mean = types.Constant(np.asarray(mean, np.float32))
            view = kernels.mirror_subtract_chw(images, drawn_window, mean)
        else:
            view = _normalize(images, spec, mirror, mean)
    else:                          # the mean image needs the full image; cut the window after
        view = _normalize(_decode(jpegs, spec, dev), spec, mirror, mean, window)
    return view, (drawn_window, drawn_alpha)   # drawn_alpha: zeros without lighting


def _lighting_mean(spec: GraphSpec, alpha):
    """Per-sample CMN mean = channel_mean - eigvec @ (alpha * lambda), computed on the CPU.

    lambda = eigval / 255 (``reference.lighting_magnitudes``: the paper's formula on 0–1
    pixels, expressed in 0–255 units). coord_transform computes M @ v + T for a point v:
    with v = alpha, M = -eigvec·diag(lambda) and T = channel_mean it gives exactly the mean
    to subtract (0–255 scale).
    """
    if alpha is None:
        return list(spec.channel_mean)
    eigvec = np.asarray(spec.eigvec, np.float64).reshape(3, 3)
    m = -(eigvec * ref.lighting_magnitudes(spec.eigval)[None, :])   # column i scaled by lambda_i
    point = fn.reshape(alpha, shape=[1, 3])
    mean = fn.coord_transform(point, M=m.ravel().tolist(), T=list(spec.channel_mean))
    return fn.reshape(mean, shape=[3])


def _center_view(jpegs, spec: GraphSpec, dev: DeviceSettings):
    return _normalize(_decode(jpegs, spec, dev), spec, 0, list(spec.channel_mean), (0.5, 0.5)), ()


def _ten_crop_view(jpegs, spec: GraphSpec, dev: DeviceSettings):
    """(10, 3, 224, 224) per image in reference.TEN_CROP_WINDOWS order, unflipped then flipped;
    one full decode, ten windows of it."""
    images = _decode(jpegs, spec, dev)
    crops = [_normalize(images, spec, flip, list(spec.channel_mean),
                        (x / ref.MAX_OFFSET, y / ref.MAX_OFFSET))
             for flip in (0, 1) for (y, x) in ref.TEN_CROP_WINDOWS]
    return fn.stack(*crops, axis=0), ()


_VIEW_BUILDERS = {"train": _train_view, "center": _center_view, "tencrop": _ten_crop_view}


shard_range = reader.shard_range
