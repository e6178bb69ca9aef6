"""DALI reads our shards through our index files: every record exactly once, with its label."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from records.folder import read_meta, shard_paths
from test_prep import read_tar

pytest.importorskip("nvidia.dali")


def _dali_records(records: Path, split: str, batch_size: int = 7):
    """[(md5 of jpg bytes, label, decoded shape)] as DALI's webdataset reader yields them (CPU)."""
    from nvidia.dali import fn, pipeline_def
    pairs = shard_paths(records, split)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs],
                                         ext=["jpg", "cls"], missing_component_behavior="error",
                                         pad_last_batch=False, name="reader")
        return jpg, cls, fn.decoders.image(jpg, device="cpu")

    p = pipe()
    p.build()
    size = p.epoch_size("reader")
    seen = []
    while len(seen) < size:
        jpg, cls, img = p.run()
        for k in range(len(jpg)):
            if len(seen) == size:
                break
            seen.append((hashlib.md5(np.array(jpg[k]).tobytes()).hexdigest(),
                         int(np.array(cls[k]).tobytes().decode()), np.array(img[k]).shape))
    return size, seen


@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_webdataset_reader_yields_every_record_once(sample_records, split):
    expected = []
    for tar, _ in shard_paths(sample_records, split):
        expected += [(hashlib.md5(j).hexdigest(), c) for j, c in read_tar(tar).values()]
    size, seen = _dali_records(sample_records, split)
    assert size == read_meta(sample_records)["counts"][split] == len(expected)
    assert sorted((h, c) for h, c, _ in seen) == sorted(expected)  # each exactly once, right label
    assert len({h for h, _ in expected}) == len(expected)  # (records are distinct images)
    assert all(shape == (256, 256, 3) for _, _, shape in seen)
