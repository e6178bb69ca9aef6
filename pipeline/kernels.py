"""An opt-in CPU kernel for the float train view: mirror, minus mean, cast to float32 CHW.

    Loader(records, view="train", options=LoaderOptions(kernel="numba"))   # CPU, float32

``crop_mirror_normalize`` is DALI's generic per-element loop; after the ROI decode of the
window this per-pixel loop, compiled by numba and run per sample by DALI's ``numba_function``
operator, does the same work in less CPU (BENCHMARKS.md, "Loaders: CPU cost per view") and
gives the same bits: every output value is float32(pixel) - float32(mean), one float32 subtraction, as
crop_mirror_normalize computes it with std = 1.

Opt-in because numba compiles it (and DALI's wrapper around it) when the operator is made, which
takes seconds. It is made once per process, on the first graph that asks for it,
and every later graph of the process reuses it (``operator``); graphs that do not ask never
import numba. The GPU graph keeps crop_mirror_normalize (there it is one small kernel).
"""
from __future__ import annotations

import functools

import numpy as np

from pipeline import reference as ref

KERNELS = ("dali", "numba")   # LoaderOptions.kernel: "dali" = crop_mirror_normalize


def mirror_subtract_chw(images, window, mean):
    """DALI graph node: uint8 (224, 224, 3) HWC ``images``, int32 (3,) ``window`` (y, x, mirror),
    float32 (3,) ``mean`` (0–255) per sample -> float32 (3, 224, 224), columns reversed where
    mirror != 0, minus mean."""
    return operator()(images, window, mean)


@functools.cache
def operator():
    """The compiled DALI operator, made on first use (the numba compile) and shared by every
    graph of the process."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba import NumbaFunction
    return NumbaFunction(run_fn=_run, setup_fn=_setup, out_types=[types.FLOAT],
                         in_types=[types.UINT8, types.INT32, types.FLOAT],
                         outs_ndim=[3], ins_ndim=[3, 1, 1], batch_processing=False)


def _setup(outs, ins):
    """Every output sample is (3, 224, 224)."""
    shapes = outs[0]
    for i in range(len(shapes)):
        shapes[i][0] = 3
        shapes[i][1] = ref.CROP
        shapes[i][2] = ref.CROP


def _run(out, img, window, mean):
    """One sample: out[c, y, x] = float32(img[y, x', c]) - mean[c], x' = 223 - x if mirrored.
    The float32 cast and the one float32 subtraction must stay as they are: they are what makes
    the result crop_mirror_normalize's bit for bit."""
    last = ref.CROP - 1
    for c in range(3):
        m = mean[c]
        for y in range(ref.CROP):
            if window[2] != 0:
                for x in range(ref.CROP):
                    out[c, y, x] = np.float32(img[y, last - x, c]) - m
            else:
                for x in range(ref.CROP):
                    out[c, y, x] = np.float32(img[y, x, c]) - m
