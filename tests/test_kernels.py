"""The opt-in numba kernel of the CPU float train view (pipeline/kernels.py): the same bits as
crop_mirror_normalize, and nothing of it in a default Loader."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline import Loader, LoaderError, LoaderOptions
from pipeline import reference as ref


@pytest.mark.slow   # one numba compile
@pytest.mark.parametrize("lighting", [ref.LIGHTING_STD, 0.0])
def test_numba_kernel_gives_crop_mirror_normalize_bits_on_photos(photo_records, lighting):
    """LoaderOptions(kernel="numba"): the CPU float train view, mirror+mean+cast by
    pipeline/kernels.py, is the default graph's output bit for bit, mirrored samples included."""
    pytest.importorskip("numba")
    kwargs = dict(split="train", view="train", batch_size=6, seed=3, num_threads=2)
    default = iter(Loader(photo_records, options=LoaderOptions(lighting_std=lighting), **kwargs))
    numba = iter(Loader(photo_records, options=LoaderOptions(lighting_std=lighting, kernel="numba",
                                                             with_draws=True), **kwargs))
    mirrors = set()
    for _ in range(2):
        (want, labels), (got, labels_nb, d) = next(default), next(numba)
        assert got.dtype == torch.float32 and got.shape == want.shape == (6, 3, 224, 224)
        assert torch.equal(got, want) and torch.equal(labels, labels_nb)
        mirrors |= set(d.mirror.tolist())
    assert mirrors == {0, 1} and want.abs().max().item() > 50


def test_the_default_loader_never_imports_numba(sample_records):
    """The numba kernel is opt-in: a default CPU Loader builds and runs without importing numba
    (no compile in every graph build); an unknown kernel is one LoaderError line."""
    code = ("import sys, torch\nfrom pipeline import Loader\n"
            f"next(iter(Loader({str(sample_records)!r}, split='train', view='train', batch_size=4, "
            "num_threads=1)))\nassert 'numba' not in sys.modules, 'numba imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    with pytest.raises(LoaderError, match="kernel must be one of dali, numba") as err:
        LoaderOptions(kernel="cuda")
    assert "\n" not in str(err.value)
