"""Shared test fixtures.

- ``gpu`` marker: tests that need CUDA (and DALI's GPU operators) are skipped with a
  reason when no GPU is visible, so the suite passes on CPU-only CI.
- ``sample_records``: one small set of records, built once per session by the real
  prep code from a small built-in sample set, shared by every test that reads records.
"""
from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch):
    """Rich takes FORCE_COLOR or TTY_COMPATIBLE=1 (set by some CI runners) as a terminal: the tests
    of plain, non-terminal output would then see progress bars and ANSI escapes."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory):
    """A small built-in sample set in ImageNet's layout (odd files included)."""
    from prep.sample import make_sample_set
    root = tmp_path_factory.mktemp("sample_src")
    make_sample_set(root, classes=4, train_per_class=12, val_per_class=5, seed=0)
    return root


@pytest.fixture(scope="session")
def sample_records(sample_source, tmp_path_factory):
    """Records built from ``sample_source``: small shards so sharding paths are exercised."""
    from prep.build_records import PrepConfig, build
    out = tmp_path_factory.mktemp("records")
    build(PrepConfig(source=str(sample_source), out=str(out), workers=1, shard_size=16,
                     progress=False))
    return out


@pytest.fixture(scope="session")
def photo_source(tmp_path_factory):
    """A small ImageNet-layout tree of real photographs (crops of scikit-image's photos; some
    under 256 px, grayscale and one CMYK JPEG); skipped when scikit-image is missing."""
    pytest.importorskip("skimage")
    from bench.photos import make_photo_set
    return make_photo_set(tmp_path_factory.mktemp("photo_src"), n=24, seed=0)


@pytest.fixture(scope="session")
def photo_records(photo_source, tmp_path_factory):
    """Records built from ``photo_source`` by the real prep code."""
    from prep.build_records import PrepConfig, build
    out = tmp_path_factory.mktemp("photo_records")
    build(PrepConfig(source=str(photo_source), out=str(out), workers=1, shard_size=8, progress=False))
    return out


@pytest.fixture
def refuse_new_files(monkeypatch):
    """``refuse_new_files(folder)``: the folder made read-only. Root writes into it anyway, so
    there the kernel's answer (open(O_CREAT) failing with EACCES, naming the file it was to
    create) is stood in for, for the temp files of common.atomic."""
    import os
    import tempfile
    from pathlib import Path
    real = tempfile.mkstemp
    refused = set()

    def mkstemp(*args, dir=None, prefix="", suffix="", **kwargs):
        if dir is not None and Path(dir) in refused:
            raise PermissionError(13, "Permission denied", str(Path(dir) / f"{prefix}x1y2z3{suffix}"))
        return real(*args, dir=dir, prefix=prefix, suffix=suffix, **kwargs)

    def refuse(folder):
        folder.chmod(0o555)
        if os.geteuid() == 0:
            refused.add(Path(folder))
            monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return refuse
