"""scripts/gpu_check.py's parts (the whole dry run is rehearsed in test_gpu_check_rehearsal.py):
the steps' PYTHONPATH, the scratch folder, the registry probe, the refusal without a GPU, and
the repeated-shard records reading as one long epoch."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def test_steps_keep_the_callers_pythonpath_behind_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/opt/x"]))
    check = gpu_check.Check(tmp_path / "r", tmp_path / "w", 60, dry=True)
    assert check.env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/tmp/site", "/opt/x"]


def test_scratch_inside_the_report_folder_is_refused(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "r"), "--dry-run", "--work", str(tmp_path / "r" / "w")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "r" / "w").exists()


def test_no_registry_is_known_without_asking_pip(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert gpu_check.registry_answers() is False
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")     # a closed port
    assert gpu_check.registry_answers(timeout=1.0) is False


def test_without_a_gpu_the_real_run_refuses_in_one_line(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert gpu_check.main([str(tmp_path / "r"), "--no-install", "--budget", "60", "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA GPU") and err.count("\n") == 1


def test_repeated_shards_make_one_long_epoch(sample_records, tmp_path):
    from pipeline import Loader
    gpu_check.repeat_shards(Path(sample_records), tmp_path / "rep", 3)
    meta = json.loads((tmp_path / "rep" / "meta.json").read_text())
    base = json.loads((Path(sample_records) / "meta.json").read_text())
    assert meta["counts"]["train"] == 3 * base["counts"]["train"]
    loader = Loader(tmp_path / "rep", split="val", view="center", batch_size=4, num_threads=1)
    assert loader.epoch_size == base["counts"]["val"]          # val untouched
    train = Loader(tmp_path / "rep", split="train", view="train", batch_size=4, num_threads=1,
                   drop_last=False)
    assert sum(len(labels) for _, labels in train) == 3 * base["counts"]["train"]
