"""tools.export (weights-only artefacts, round trip to the same logits) and predict.py (the
eval path's answer on the records' own images)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import checkpoint as ckpt
from tools import export, predict, weights
from engine.voting import vote
from model import AlexNet, AlexNetConfig
from pipeline import Loader, LoaderOptions, reference
from records.folder import read_meta, shard_paths


@pytest.fixture(scope="module")
def run_dir(sample_records, tmp_path_factory):
    """A run folder with a (randomly initialised, two-tower) checkpoint, as train.py writes it."""
    folder = tmp_path_factory.mktemp("export") / "run"
    folder.mkdir()
    torch.manual_seed(1)
    net = AlexNet(AlexNetConfig(num_classes=4))
    config = {"records": str(sample_records), "mean": "channel", "towers": 2, "lrn": True,
              "overlap_pool": True, "dropout": 0.5, "init": "paper", "lr": 0.01}
    ckpt.save(folder / "best.pt", {"model": net.state_dict(), "optimizer": {"state": {}}, "epoch": 1,
                                   "step": 2, "config": config})
    return folder


@pytest.fixture(scope="module")
def trained(run_dir):
    return weights.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def sharp(run_dir, sample_records):
    """The same net with a new fc8 that reads only how an image's fc7 features differ from the
    average image's, scaled to logits a few units apart: a random init's outputs barely move
    between images, which would let a wrong crop or a wrong vote pass unnoticed."""
    trained = weights.load(run_dir, device="cpu")
    tar = shard_paths(sample_records, "val")[0][0]
    views = np.stack([reference.center_view(reference.decode(jpg), trained.mean) for _, jpg, _ in reference.iter_tar(tar)])
    from tools.neighbours import fc7
    feats = fc7(trained.net, torch.from_numpy(views)).double()
    mean = feats.mean(0)
    w = torch.randn(4, feats.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w -= torch.outer(w @ mean / (mean @ mean), mean)               # blind to the average image
    w *= 3 / (feats @ w.T).std()
    with torch.no_grad():
        trained.net.fc8.weight.copy_(w.float()), trained.net.fc8.bias.zero_()
    return trained


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(3, 3, 224, 224) * 60           # 0-255 scale minus mean: about photo spread


def test_state_dict_export_is_weights_only_and_round_trips_exactly(run_dir, trained, images, tmp_path, sample_records):
    out = tmp_path / "alexnet.pt"
    assert export.main([str(run_dir), "--out", str(out)]) == 0
    raw = torch.load(out, weights_only=True)            # plain containers: no class of this repo needed
    assert set(raw) >= {"model", "config", "classes", "mean", "format"} and "optimizer" not in raw
    assert raw["classes"] == read_meta(sample_records)["classes"]
    assert raw["model"]["towers.0.conv1.weight"].shape == (48, 3, 11, 11)
    assert raw["model"]["towers.1.fc7.weight"].shape == (2048, 4096)
    assert raw["model"]["fc8.weight"].shape == (4, 4096)
    stats = json.loads((sample_records / "stats.json").read_text())
    assert raw["mean"].tolist() == pytest.approx(stats["mean"])
    again = weights.load(out, device="cpu")              # no records folder needed any more
    with torch.no_grad():
        assert torch.equal(again.net(images), trained.net(images))
    assert again.classes == trained.classes and np.array_equal(again.mean, trained.mean)


def test_torchscript_and_export_give_the_same_logits(run_dir, trained, images, tmp_path):
    with torch.no_grad():
        expected = trained.net(images)
    out = tmp_path / "ts.pt"
    assert export.main([str(run_dir), "--out", str(out), "--format", "torchscript"]) == 0
    extra = {"meta.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["meta.json"])["classes"] == trained.classes
    with torch.no_grad():
        torch.testing.assert_close(module(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module(images[:1]), expected[:1], rtol=1e-5, atol=1e-5)   # other batch size
    out = tmp_path / "ep.pt2"
    assert export.main([str(run_dir), "--out", str(out), "--format", "export"]) == 0
    extra = {"meta.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["meta.json"])["mean_kind"] == "channel"
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), expected, rtol=1e-5, atol=1e-5)


def test_traced_files_are_refused_by_predict_and_export_with_one_line(run_dir, tmp_path, capsys):
    """TorchScript and torch.export files hold a traced net, not weights: predict.py and
    tools.export say so in one line (not torch's weights_only warning and internals)."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(photo)
    for fmt, name, kind in (("torchscript", "a.ts", "TorchScript"), ("export", "a.pt2", "torch.export")):
        assert export.main([str(run_dir), "--out", str(tmp_path / name), "--format", fmt]) == 0
        capsys.readouterr()
        assert predict.main([str(photo), "--checkpoint", str(tmp_path / name), "--device", "cpu"]) == 2
        assert export.main([str(tmp_path / name), "--out", str(tmp_path / "again.pt")]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 2 and all(f"{tmp_path / name}: a {kind} file" in line for line in lines), captured


def test_export_out_that_is_a_folder_or_under_a_file_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert export.main([str(run_dir), "--out", str(tmp_path)]) == 2
    assert export.main([str(run_dir), "--out", str(tmp_path / "afile" / "w.pt")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {tmp_path}: is a folder; give the file to write",
        f"error: --out {tmp_path / 'afile' / 'w.pt'}: its folder {tmp_path / 'afile'} does not exist or is not a folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]      # no temp file left behind


def test_onnx_without_the_package_is_one_line(run_dir, tmp_path, capsys):
    if importlib.util.find_spec("onnx") is not None:
        pytest.skip("onnx is installed")
    assert export.main([str(run_dir), "--out", str(tmp_path / "a.onnx"), "--format", "onnx"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "a.onnx").exists()


def record_pngs(records, folder):
    """The val records' images, decoded (PIL, libjpeg-turbo like DALI's CPU decoder) and saved
    as lossless PNGs, so predict.py sees exactly the pixels the Loader decodes."""
    paths, labels = {}, {}
    for tar, _ in shard_paths(records, "val"):
        for key, jpg, label in reference.iter_tar(tar):
            paths[key] = folder / f"{key}.png"
            Image.fromarray(reference.decode(jpg)).save(paths[key])
            labels[key] = label
    return paths, labels


@pytest.mark.parametrize("view", ["center", "tencrop"])
def test_predict_gives_the_eval_paths_probabilities(view, sharp, sample_records, tmp_path):
    trained = sharp
    paths, _ = record_pngs(sample_records, tmp_path)
    loader = Loader(sample_records, split="val", view=view, batch_size=8, options=LoaderOptions(with_draws=True))
    expected, keys = [], []
    with torch.no_grad():
        for batch, _, draws in loader:
            if view == "tencrop":
                expected.append(vote(trained.net(batch.flatten(0, 1)).view(len(batch), 10, -1)))
            else:
                expected.append(torch.softmax(trained.net(batch), dim=1))
            keys += draws.keys
            break                                        # one batch of 8 images is enough
    expected = torch.cat(expected)
    pixels = [predict.load_image(paths[k]) for k in keys]
    assert np.array_equal(pixels[0], reference.decode(next(reference.iter_tar(shard_paths(sample_records, "val")[0][0]))[1]))
    got = predict.probabilities(trained, pixels, tencrop=view == "tencrop")
    assert expected.max(1).values.min() < 0.9       # not saturated: the comparison below means something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_predict_cli_prints_top_classes(run_dir, sample_records, tmp_path, capsys):
    paths, _ = record_pngs(sample_records, tmp_path)
    first = sorted(paths.values())[:2]
    assert predict.main([*map(str, first), "--checkpoint", str(run_dir), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    classes = read_meta(sample_records)["classes"]
    assert lines[0] == str(first[0]) and len(lines) == 2 * (1 + 4)           # 4 classes: top-4
    probs = [float(line.split()[1].rstrip("%")) for line in lines[1:5]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(100, abs=0.03)
    assert {line.split()[2] for line in lines[1:5]} == set(classes)


def test_predict_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [[str(tmp_path / "missing.jpg"), "--checkpoint", str(run_dir)],
             [str(bad), "--checkpoint", str(run_dir), "--device", "cpu"],
             [str(bad), "--checkpoint", str(tmp_path / "none.pt")]]
    for argv in cases:
        assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert str(tmp_path / "missing.jpg") in err[0] and str(bad) in err[1] and "none.pt" in err[2]


def test_predict_on_a_folder_classifies_the_good_images_and_names_the_bad(run_dir, sample_records, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    paths, _ = record_pngs(sample_records, tmp_path / "folder")
    good = sorted(paths.values())[:2]
    folder = good[0].parent
    for extra in folder.iterdir():
        if extra not in good:
            extra.unlink()
    (folder / "notes.txt").write_text("not an image")
    assert predict.main([str(folder), "--checkpoint", str(run_dir), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"error: {folder / 'notes.txt'}: not an image (PIL cannot identify it)"]
    assert [line for line in captured.out.splitlines() if not line.startswith("  ")] == [str(p) for p in good]


def test_predict_without_checkpoint_uses_the_newest_and_says_which(run_dir, tmp_path, monkeypatch, capsys):
    """The run whose checkpoint was written last wins, not the name that sorts last (runs/alexnet
    sorts after every timestamp); within a run, best.pt before last.pt. Named on stderr."""
    monkeypatch.chdir(tmp_path)
    named, stamped = tmp_path / "runs" / "alexnet", tmp_path / "runs" / "20250101-000000"
    for folder, files in ((named, ("best.pt", "last.pt")), (stamped, ("last.pt",))):
        folder.mkdir(parents=True)
        for name in files:
            shutil.copy(run_dir / "best.pt", folder / name)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(photo)
    stamp = 1_700_000_000

    def picked(times: dict) -> tuple[str, list[str]]:
        for path, t in times.items():
            os.utime(path, (t, t))
        assert predict.main([str(photo), "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        assert captured.out.splitlines()[0] == str(photo)             # stdout: the classes only
        return captured.err

    said = picked({named / "best.pt": stamp, named / "last.pt": stamp + 10, stamped / "last.pt": stamp + 20})
    assert said == "checkpoint: runs/20250101-000000/last.pt (the newest under runs/; --checkpoint to choose)\n"
    said = picked({stamped / "last.pt": stamp + 5})          # alexnet's last.pt is newer now: its best.pt
    assert said == "checkpoint: runs/alexnet/best.pt (the newest under runs/; --checkpoint to choose)\n"


def test_lrn_inference_path_equals_the_training_path():
    """Without autograd the LRN runs as plain ops (what TorchScript can save): the same numbers."""
    from model import local_response_norm
    x = torch.randn(3, 96, 13, 13) * 40
    with torch.no_grad():
        plain = local_response_norm(x, groups=2)
    assert torch.equal(plain, local_response_norm(x.requires_grad_(), groups=2).detach())


def test_export_into_a_read_only_folder_names_the_target(run_dir, tmp_path, refuse_new_files, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_new_files(ro)
    assert export.main([str(run_dir), "--out", str(ro / "alexnet.pt")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {ro / 'alexnet.pt'}: Permission denied"]
    ro.chmod(0o755)
    assert os.listdir(ro) == []


@pytest.fixture(scope="module")
def named_records(sample_records, tmp_path_factory):
    """The sample records with class names in meta.json (as --class-names stores them), one
    class left without a name: it falls back to its wnid."""
    folder = tmp_path_factory.mktemp("named") / "records"
    shutil.copytree(sample_records, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["names"] = {w: f"name of {w}, first" for w in meta["classes"][:3]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_predict_and_export_carry_the_class_names_of_meta_json(run_dir, named_records, tmp_path, capsys):
    classes = read_meta(named_records)["classes"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(photo)
    argv = ["--checkpoint", str(run_dir), "--records", str(named_records), "--device", "cpu"]
    assert predict.main([str(photo), *argv]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    shown = {row.split(maxsplit=3)[2]: row.split(maxsplit=3)[3:] for row in rows}   # rank, prob, wnid, name
    assert shown == {**{w: [f"name of {w}, first"] for w in classes[:3]}, classes[3]: []}
    out = tmp_path / "alexnet.pt"
    assert export.main([str(run_dir), "--out", str(out), "--records", str(named_records)]) == 0
    raw = torch.load(out, weights_only=True)
    assert raw["names"] == [f"name of {w}, first" for w in classes[:3]] + [classes[3]]
    capsys.readouterr()
    assert predict.main([str(photo), "--checkpoint", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == rows          # the export prints the same


def test_odd_characters_in_names_and_file_names_stay_on_their_line(run_dir, tmp_path, capsys):
    """Names come from files users write (a weights file's ``names`` can hold anything) and
    photos can have any file name: a newline in either must not break the one-line-per-class
    layout of stdout; control characters are shown escaped."""
    out = tmp_path / "alexnet.pt"
    assert export.main([str(run_dir), "--out", str(out)]) == 0
    raw = torch.load(out, weights_only=True)
    raw["names"] = ["golf\nball", "tab\there", "bell\x07", "plain"]
    torch.save(raw, out)
    photo = tmp_path / "odd\nname.png"
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(photo)
    capsys.readouterr()
    assert predict.main([str(photo), "--checkpoint", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 4 and lines[0] == str(tmp_path / "odd\\nname.png")
    names = {line.split(maxsplit=3)[3] for line in lines[1:]}
    assert names == {"golf\\nball", "tab\\there", "bell\\x07", "plain"}


def test_prep_and_predict_treat_exif_rotation_and_alpha_alike(tmp_path):
    """A camera photo stored sideways with EXIF Orientation=6 and a PNG with transparency:
    the records hold exactly predict.py's pixels (the stored orientation, alpha dropped), so
    the net is asked about the image it was trained on the same way."""
    skimage = pytest.importorskip("skimage.data")
    from prep.build_records import PrepConfig, build
    from prep.transform import encode_jpeg
    from records.keys import read_keys
    photo = skimage.chelsea()                                     # 300 x 451, a real photograph
    src = tmp_path / "src"
    for split in ("train", "val"):
        (src / split / "n00000001").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6                                              # Orientation: rotate 90° clockwise to view
    Image.fromarray(photo).save(src / "train" / "n00000001" / "cat.jpg", quality=95, exif=exif)
    rgba = np.dstack([photo, np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), (photo.shape[0], 1))])
    Image.fromarray(rgba, "RGBA").save(src / "train" / "n00000001" / "cat.png")
    Image.fromarray(photo).save(src / "val" / "n00000001" / "cat.jpg", quality=95)
    out = tmp_path / "records"
    build(PrepConfig(source=str(src), out=str(out), workers=1, progress=False))
    by_path = {rel: key for key, (_, rel) in read_keys(out, "train").items()}
    stored = {key: jpg for tar, _ in shard_paths(out, "train") for key, jpg, _ in reference.iter_tar(tar)}
    for name in ("cat.jpg", "cat.png"):
        path = src / "train" / "n00000001" / name
        pixels = predict.load_image(path)
        assert stored[by_path[f"train/n00000001/{name}"]] == encode_jpeg(pixels, 90)    # byte for byte
    with Image.open(src / "train" / "n00000001" / "cat.jpg") as im:
        assert im.getexif()[0x0112] == 6 and im.size == (451, 300)     # the tag is there; not applied
    upright = predict.load_image(src / "val" / "n00000001" / "cat.jpg")
    assert np.abs(predict.load_image(src / "train" / "n00000001" / "cat.jpg").astype(int) - upright).mean() < 3
