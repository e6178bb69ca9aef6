"""tools.figures on a tiny run folder: the PNGs and their sizes, the colour-specialisation
number on constructed kernels, and Figure 4's neighbours (a training image finds itself)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import checkpoint as ckpt
from tools import figures, kernel_figure, neighbours, weights
from model import AlexNet, AlexNetConfig
from pipeline import Loader, LoaderOptions, reference
from records.folder import read_stats, shard_paths

METRICS = [  # three epochs, the lr divided by 10 after epoch 2
    {"epoch": 1, "step": 2, "lr": 0.01, "train_loss": 1.4, "train_top1_err": 0.7, "train_top5_err": 0.0,
     "val_top1_err": 0.75, "val_top5_err": 0.0, "val_loss": 1.38},
    {"epoch": 2, "step": 4, "lr": 0.01, "train_loss": 1.2, "train_top1_err": 0.6, "train_top5_err": 0.0,
     "val_top1_err": 0.5, "val_top5_err": 0.0, "val_loss": 1.3},
    {"epoch": 3, "step": 6, "lr": 0.001, "train_loss": 1.0, "train_top1_err": 0.4, "train_top5_err": 0.0,
     "val_top1_err": 0.45, "val_top5_err": 0.0, "val_loss": 1.2},
]


def save_run(folder, records, towers: int = 2, seed: int = 0):
    """A run folder as train.py leaves it mid-run: a checkpoint, and metrics.jsonl whose last
    line is still being written."""
    torch.manual_seed(seed)
    net = AlexNet(AlexNetConfig(num_classes=4, towers=towers))
    folder.mkdir(parents=True, exist_ok=True)
    config = {"records": str(records), "mean": "channel", "towers": towers, "lrn": True,
              "overlap_pool": True, "dropout": 0.5, "init": "paper"}
    ckpt.save(folder / "last.pt", {"model": net.state_dict(), "epoch": 3, "step": 6, "config": config})
    (folder / "config.json").write_text(json.dumps(config))
    lines = "".join(json.dumps(m) + "\n" for m in METRICS)
    (folder / "metrics.jsonl").write_text(lines + '{"epoch": 4, "st')
    return net


@pytest.fixture(scope="module")
def run_dir(sample_records, tmp_path_factory):
    folder = tmp_path_factory.mktemp("figures") / "run"
    save_run(folder, sample_records)
    return folder


@pytest.fixture(scope="module")
def drawn(run_dir):
    rc = figures.main([str(run_dir), "--batch-size", "16", "--device", "cpu"])
    return rc, run_dir


def png_size(path):
    with Image.open(path) as im:
        return im.size


def test_every_png_is_written_with_its_size(drawn):
    rc, run = drawn
    assert rc == 0
    assert png_size(run / "curves.png") == (1000, 400)            # 10 x 4 in at 100 dpi
    # 16 kernels of 55 px (11 x 5) a row with 2 px gaps: 16*55 + 17*2 = 914;
    # 20 px caption + 2 towers x (3 rows: 3*55 + 4*2 = 173) + 10 px between them = 376
    assert png_size(run / "conv1.png") == (914, 376)
    # 5 queries x (query + 6 neighbours) of 112 px, 4 px gaps, 16 px after the query column:
    # 7*112 + 8*4 + 16 = 832 wide; 20 px caption + 5*(112 + 16 px label) + 6*4 = 684 high
    assert png_size(run / "neighbours.png") == (832, 684)


def png_caption(path):
    with Image.open(path) as im:
        return im.text.get("Description")


def test_every_png_carries_a_caption_line(drawn):
    """Which weights a picture shows, in the picture (drawn above it) and in its PNG text."""
    _, run = drawn
    assert png_caption(run / "curves.png") == "run · metrics.jsonl to epoch 3, step 6 · 2 towers"
    for name in ("conv1.png", "neighbours.png"):
        assert png_caption(run / name) == "run/last.pt · epoch 3, step 6 · 2 towers"
        strip = np.asarray(Image.open(run / name).convert("L"))[:20]
        assert (strip < 128).sum() > 200                       # text drawn in the caption line


def test_conv1_block_order_and_contrast_stretch(drawn):
    """Upper block = tower 0: each kernel cell holds its own kernel, stretched to 0..255."""
    _, run = drawn
    grid = np.asarray(Image.open(run / "conv1.png").convert("RGB"))
    net = weights.load(run / "last.pt", device="cpu").net
    for tower, top in ((0, 20 + 2), (1, 20 + 173 + 10 + 2)):
        kernel = net.towers[tower].conv1.weight[5].detach().double().numpy()   # row 0, column 5
        x = 2 + 5 * 57
        cell = grid[top:top + 55:5, x:x + 55:5]                              # one pixel per weight
        lo, hi = kernel.min(), kernel.max()
        expected = np.round((kernel.transpose(1, 2, 0) - lo) / (hi - lo) * 255)
        assert np.array_equal(cell, expected.astype(np.uint8))
        assert cell.min() == 0 and cell.max() == 255


def test_colour_share_is_zero_for_grey_kernels_and_positive_for_colour():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.normal(size=(8, 1, 11, 11)), 3, axis=1)         # R = G = B everywhere
    assert np.allclose(kernel_figure.colour_share(grey), 0.0, rtol=0, atol=1e-12)   # (x+x+x)/3 rounds
    opponent = np.stack([grey[:, 0], -grey[:, 0], np.zeros_like(grey[:, 0])], axis=1)   # R - G
    assert np.allclose(kernel_figure.colour_share(opponent), 1.0)
    # every pixel (2, 0, 1): grey part (1, 1, 1) carries 3 of the energy 5, the rest (1, -1, 0) 2
    mixed = np.broadcast_to(np.array([2.0, 0.0, 1.0])[None, :, None, None], (1, 3, 11, 11))
    assert kernel_figure.colour_share(mixed) == pytest.approx([0.4])


def test_conv1_json_separates_a_grey_tower_from_a_colour_tower(tmp_path):
    net = AlexNet(AlexNetConfig(num_classes=4))
    with torch.no_grad():
        w0 = net.towers[0].conv1.weight
        w0.copy_(w0[:, :1].expand_as(w0))                  # tower 0: grey kernels
    summary = kernel_figure.conv1_figure(net, tmp_path)
    assert summary["colour_share"][0] < 1e-6 and summary["colour_share"][1] > 0.5
    assert json.loads((tmp_path / "conv1.json").read_text())["colour_share"] == summary["colour_share"]


def test_single_tower_net_is_one_block(tmp_path):
    net = AlexNet(AlexNetConfig(num_classes=4, towers=1))
    kernel_figure.conv1_figure(net, tmp_path)
    assert png_size(tmp_path / "conv1.png") == (914, 173)


def test_single_tower_run_draws_its_48_kernels_under_a_one_tower_caption(tmp_path, sample_records):
    """The demo's one-tower net: one block of 48 kernels, each in its cell, captioned as one tower."""
    run = tmp_path / "run1"
    net = save_run(run, sample_records, towers=1, seed=4)
    assert figures.main([str(run), "--only", "conv1", "--device", "cpu"]) == 0
    assert png_size(run / "conv1.png") == (914, 20 + 173)
    assert png_caption(run / "conv1.png") == "run1/last.pt · epoch 3, step 6 · 1 tower"
    grid = np.asarray(Image.open(run / "conv1.png").convert("RGB"))
    for i in (0, 17, 47):                                              # first, a middle one, the last
        r, c = divmod(i, 16)
        kernel = net.towers[0].conv1.weight[i].detach().double().numpy()
        cell = grid[20 + 2 + r * 57:20 + 2 + r * 57 + 55:5, 2 + c * 57:2 + c * 57 + 55:5]
        lo, hi = kernel.min(), kernel.max()
        assert np.array_equal(cell, np.round((kernel.transpose(1, 2, 0) - lo) / (hi - lo) * 255).astype(np.uint8))



def test_curves_mark_lr_drops_and_read_a_partial_file(run_dir):
    metrics = figures.read_metrics(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]             # the half-written line is skipped
    assert figures.lr_drops(metrics) == [(2, 0.001)]              # drawn at the end of epoch 2


def test_a_run_without_epochs_or_checkpoint_draws_nothing_and_says_so(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert figures.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no finished epoch yet" in out and "no checkpoint yet" in out
    assert not list(tmp_path.glob("*.png"))


def test_bad_input_is_one_line_and_exit_2(tmp_path, run_dir, capsys):
    assert figures.main([str(tmp_path / "nope")]) == 2
    assert figures.main([str(run_dir), "--checkpoint", "missing.pt", "--only", "conv1"]) == 2
    (tmp_path / "empty").mkdir()
    assert figures.main([str(tmp_path / "empty")]) == 2          # a typo'd path to an existing folder
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'nope'}: no such run folder", "error: missing.pt: no such checkpoint file",
                   f"error: {tmp_path / 'empty'}: not a run folder (no config.json, metrics.jsonl or checkpoint)"]


def test_a_training_image_is_its_own_nearest_neighbour(run_dir, sample_records):
    """Queries made independently of the Loader (the record decoded by PIL, centre view by
    the numpy reference, fc7 by the net) must find their own record among the Loader's
    train features at distance ~0, and every other image farther away."""
    trained = weights.load(run_dir / "last.pt", device="cpu")
    mean = read_stats(sample_records).mean
    tar, _ = shard_paths(sample_records, "train")[1]
    records = list(reference.iter_tar(tar))[:3]
    views = torch.from_numpy(np.stack([reference.center_view(reference.decode(jpg), mean) for _, jpg, _ in records]))
    queries = neighbours.fc7(trained.net, views)
    loader = Loader(sample_records, split="train", view="center", batch_size=16, options=LoaderOptions(with_draws=True))
    found = neighbours.nearest(queries, neighbours.fc7_batches(trained.net, loader), k=3)
    for i, (key, _, label) in enumerate(records):
        assert found.keys[i][0] == key and found.labels[i][0] == label
        assert found.distance[i][0] < 1e-3 * found.distance[i][1]
    assert found.distance[:, 1].min() > 0


def test_neighbours_name_each_images_source_photo(drawn, sample_source, sample_records):
    """neighbours.json follows every image back to its photo (keys.tsv): the file exists and a
    train photo lies in its class's folder; without class names, the wnid is the name."""
    _, run = drawn
    summary = json.loads((run / "neighbours.json").read_text())
    assert summary["caption"] == "run/last.pt · epoch 3, step 6 · 2 towers"
    images = [(q["photo"], q["label"], q["name"], "val") for q in summary["queries"]]
    images += [(n["photo"], n["label"], n["name"], "train") for q in summary["queries"] for n in q["neighbours"]]
    assert len(images) == 5 * 7
    for photo, label, name, split in images:
        path = Path(photo)
        assert path.is_file() and path.is_relative_to(sample_source / split), photo
        assert name == label
        if split == "train":
            assert path.parent.name == label


def test_neighbours_use_class_names_and_say_once_when_photos_cannot_be_traced(sample_records, tmp_path, capsys):
    """Records with names in meta.json but built before keys.tsv: the names appear, every
    photo is null, and one line says why."""
    records = tmp_path / "records"
    shutil.copytree(sample_records, records)
    meta = json.loads((records / "meta.json").read_text())
    meta["names"] = {w: f"class {i}" for i, w in enumerate(meta["classes"])}
    (records / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):
        (records / split / "keys.tsv").unlink()
    run = tmp_path / "run"
    save_run(run, records)
    assert figures.main([str(run), "--only", "neighbours", "--device", "cpu", "--queries", "2",
                         "--neighbours", "2", "--train-limit", "16", "--batch-size", "16"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "keys.tsv" in line]
    assert len(said) == 1 and "missing" in said[0]
    summary = json.loads((run / "neighbours.json").read_text())
    entries = summary["queries"] + [n for q in summary["queries"] for n in q["neighbours"]]
    assert len(entries) == 2 + 2 * 2
    assert all(e["photo"] is None and e["name"] == f"class {meta['classes'].index(e['label'])}" for e in entries)
    assert summary["photos"].startswith("not traced")


def test_bench_bar_chart_has_one_bar_row_per_table_row(tmp_path):
    from common.charts import bar_chart
    rows = {"dali": (300.0, 290.0, 310.0), "torch": (100.0, 95.0, 120.0), "decode": (450.0, 440.0, 460.0)}
    bar_chart(tmp_path / "bench.png", rows, title="loaders", xlabel="images/s")
    assert png_size(tmp_path / "bench.png") == (800, 255)          # 8 in x (1.2 + 0.45 per row) in, 100 dpi
