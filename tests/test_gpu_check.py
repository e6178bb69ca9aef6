"""scripts/gpu_check.py: its dry run (CPU, tiny sizes) runs every step that needs no CUDA and
writes the report; the repeated-shard records read as one long epoch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_runs_every_cpu_step_and_writes_the_report(tmp_path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", str(tmp_path / "report"), "--dry-run",
                           "--no-install", "--budget", "900"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)   # a step is skipped when its minimum time is not left: room for a slow CI
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert done.returncode == 0, [(n, s["status"], s["output_tail"][-500:]) for n, s in steps.items()]
    ran = {"environment", "gpu tests", "sample set", "records", "loader bench", "model bench fp32",
           "model bench bf16 channels_last", "model bench fp16 channels_last", "train cpu", "train cpu fp16", "train cpu u8-loader"}
    assert {n for n, s in steps.items() if s["status"] == "passed"} >= ran
    assert steps["records"]["results"]["train_images"] == 4 * 12 * 2
    assert set(steps["loader bench"]["results"]) == {"dali", "dali-u8", "torch", "decode"}
    assert steps["loader bench"]["results"]["dali-u8"]["finish_images_per_s"] > 0
    assert steps["model bench fp16 channels_last"]["results"]["ours"] > 0
    assert steps["train cpu"]["results"]["steps"] == 2
    assert "--amp fp16" in " ".join(steps["train cpu fp16"]["command"])
    assert "--loader-device cpu" in " ".join(steps["train cpu u8-loader"]["command"])
    markdown = (tmp_path / "report" / "gpu_check.md").read_text()
    assert "| loader bench | passed |" in markdown and "dry run" in markdown


def test_without_a_gpu_the_real_run_refuses_in_one_line(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert gpu_check.main([str(tmp_path / "r"), "--no-install", "--budget", "60"]) == 2
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
