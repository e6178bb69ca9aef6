"""--ffcv: FFCV's .beton files hold the same 256x256 images, labels and order as the records."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from prep.build_records import PrepConfig, build
from prep.sample import make_sample_set
from test_prep import all_records

pytest.importorskip("ffcv")


def test_ffcv_betons_match_the_records(tmp_path):
    from ffcv.reader import Reader
    src, out = tmp_path / "src", tmp_path / "out"
    make_sample_set(src, classes=2, train_per_class=5, val_per_class=2, seed=3, workers=1)
    summary = build(PrepConfig(source=str(src), out=str(out), shard_size=3, workers=2, ffcv=True,
                               progress=False))
    assert summary["ffcv"] == [str(out / "train.beton"), str(out / "val.beton")]
    for split in ("train", "val"):
        records = all_records(out, split)
        reader = Reader(str(out / f"{split}.beton"))
        assert reader.num_samples == len(records) == summary["counts"][split]
        raw = (out / f"{split}.beton").read_bytes()
        ptrs = {int(a["sample_id"]): (int(a["ptr"]), int(a["size"])) for a in reader.alloc_table}
        for i, (_, jpg, label) in enumerate(records):
            (mode, width, height, _), beton_label = reader.metadata[i]
            assert (mode, width, height, beton_label) == (0, 256, 256, label)  # mode 0 = jpg
            ptr, size = ptrs[i]
            ffcv_img = np.asarray(Image.open(io.BytesIO(raw[ptr:ptr + size]))).astype(float)
            ours = np.asarray(Image.open(io.BytesIO(jpg))).astype(float)
            assert np.abs(ffcv_img - ours).mean() < 3.0  # same pixels, two q90 JPEG encoders
    again = build(PrepConfig(source=str(src), out=str(out), shard_size=3, workers=2, ffcv=True,
                             progress=False))
    assert again["reused"] and again["ffcv"] == summary["ffcv"]
