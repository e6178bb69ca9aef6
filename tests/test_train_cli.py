"""train.py end to end on the sample records, on the CPU, kept tiny (AlexNet on 2 cores is slow):
the single-GPU comparison net (--towers 1), batches of 2-4 images, 1-2 steps per epoch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import parse_train_args
from engine.run import main

REPO = Path(__file__).resolve().parent.parent


def tiny(records, out, *extra):
    return ["--records", str(records), "--gpus", "", "--towers", "1", "--batch-size", "4",
            "--no-progress", "--out", str(out), *map(str, extra)]


# --profile's windows shrunk to the 2 steps: step 1 end to end (the warm-up's length is tested
# in test_train_profile), step 2 split by phase
SMOKE = ("--epochs", "1", "--epoch-steps", "2", "--profile", "--profile-warmup", "0", "--profile-window", "1")


@pytest.fixture(scope="module")
def smoke_run(sample_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    rc = main(tiny(sample_records, out, *SMOKE))
    return rc, out                # shared by the tests below: one that resumes it works on a copy


def test_smoke_run_writes_the_run_folder(smoke_run, sample_records):
    rc, out = smoke_run
    assert rc == 0
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "eval.json", "profile.json",
            "trace.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["records"] == str(sample_records) and config["devices"] == ["cpu"] and config["lr"] == 0.01
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    assert (m["epoch"], m["step"], m["lr"], m["train_images"]) == (1, 2, 0.01, 8)
    for key in ("train_loss", "train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err", "images_per_s"):
        assert isinstance(m[key], float)
    ev = json.loads((out / "eval.json").read_text())
    n_val = json.loads((sample_records / "meta.json").read_text())["counts"]["val"]
    assert ev["center"]["images"] == ev["tencrop"]["images"] == n_val      # every val record once
    state = ckpt.load(out / "last.pt")
    assert (state["epoch"], state["step"], state["batch"]) == (1, 2, 0)
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 2


def test_profile_writes_a_trace_and_a_table(smoke_run):
    _, out = smoke_run
    prof = json.loads((out / "profile.json").read_text())
    assert prof["steps"] == 1 and prof["images"] == 4
    assert (prof["warmup_steps"], prof["end_to_end_steps"], prof["model_steps"]) == (0, 1, 1)
    assert prof["end_to_end_images_per_s"] > 0 and prof["model_images_per_s"] > 0
    assert set(prof["phases"]) == {"data", "h2d", "forward", "backward", "optimizer"}
    assert all(p["ms_per_step"] > 0 for k, p in prof["phases"].items() if k != "h2d")   # each one timed
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer"} <= names          # our record_function labels


def test_eval_only_prints_single_and_ten_crop(smoke_run, sample_records, capsys, tmp_path):
    _, out = smoke_run
    # no --records: the run's own (sample_records, not the default data/records)
    # a run folder stands for its best.pt
    rc = main(["--eval-only", "--checkpoint", str(out),
               "--gpus", "", "--batch-size", "10", "--no-progress", "--out", str(tmp_path / "ev")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "1 crop (centre)" in text and "10 crops (voted)" in text and "top-5 error" in text
    # the same weights, the same val set: the same errors as the run's own final table
    ev, mine = (json.loads(p.read_text()) for p in (out / "eval.json", tmp_path / "ev" / "eval-best.json"))
    assert f"{100 * ev['center']['top1_err']:.2f}%" in text
    assert mine["checkpoint"] == str(out / "best.pt")
    for view in ("center", "tencrop"):      # another batch size: the summed loss may differ in the last bits
        assert {k: mine[view][k] for k in ("images", "top1_err", "top5_err")} == \
            {k: ev[view][k] for k in ("images", "top1_err", "top5_err")}
        assert mine[view]["loss"] == pytest.approx(ev[view]["loss"], rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(smoke_run, tmp_path, capsys):
    out = tmp_path / "run"                  # a copy: the shared smoke run stays as other tests read it
    shutil.copytree(smoke_run[1], out)
    before, config_before = (out / "last.pt").read_bytes(), (out / "config.json").read_bytes()
    # continue the smoke run with an absurd lr: the loss overflows within a few steps
    rc = main(["--resume", str(out), "--epochs", "2", "--max-steps", "100", "--epoch-steps", "3",
               "--lr", "1e6", "--no-progress"])
    assert rc == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"the last finite checkpoint is {out / 'last.pt'} (step 2)" in err
    assert (out / "last.pt").read_bytes() == before
    assert (out / "config.json").read_bytes() == config_before     # it describes last.pt, not the failed flags
    for path in out.glob("*.pt"):
        state = ckpt.load(path)
        assert ckpt.nonfinite_tensor({"m": state["model"], "o": state["optimizer"]}) is None, path


@pytest.mark.slow
def test_plateau_divides_the_optimizers_lr_by_10(sample_records, tmp_path):
    """An improvement threshold no error can beat makes every epoch after the first (which sets
    the best) a bad one: with patience 1 the lr is divided after epochs 2 and 3, and epoch 3's
    steps run at the divided lr."""
    out = tmp_path / "run"
    rc = main(tiny(sample_records, out, "--epochs", "3", "--epoch-steps", "1", "--no-final-eval",
                   "--plateau-patience", "1", "--plateau-threshold", "1.0"))
    assert rc == 0
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.01, 0.01, 0.001])
    state = ckpt.load(out / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)   # epoch 3's steps
    assert state["schedule"]["lr"] == pytest.approx(0.0001) and state["schedule"]["drops"] == 2


@pytest.mark.slow
def test_auto_resume_reruns_the_same_command_and_keeps_the_schedules_lr(sample_records, tmp_path):
    """The command that started a run, given again (what torchrun --max-restarts and a requeued
    job do), continues it: the first call starts in an empty --out, the second continues from
    last.pt, and its explicit --lr (equal to the saved one) does not undo the plateau's drop:
    lr, weights and metrics equal one uninterrupted run."""
    flags = ["--epoch-steps", "1", "--no-final-eval", "--plateau-patience", "1", "--plateau-threshold", "1.0",
             "--lr", "0.01", "--seed", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(tiny(sample_records, full, *flags, "--epochs", "3")) == 0
    assert main(tiny(sample_records, part, *flags, "--epochs", "2", "--auto-resume")) == 0
    assert ckpt.load(part / "last.pt")["schedule"]["lr"] == pytest.approx(0.001)   # dropped after epoch 2
    assert main(tiny(sample_records, part, *flags, "--epochs", "3", "--auto-resume")) == 0
    lrs = [json.loads(line)["lr"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.01, 0.01, 0.001])
    a, b = ckpt.load(full / "last.pt"), ckpt.load(part / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 3)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert main(tiny(sample_records, part, *flags, "--epochs", "3", "--auto-resume")) == 0   # done: nothing to do
    assert ckpt.load(part / "last.pt")["step"] == 3


def test_a_finished_run_resumed_only_evaluates_what_was_not_evaluated(sample_records, tmp_path, capsys):
    """A run killed during its final evaluation (every epoch saved, no eval.json for those
    weights): resuming runs the evaluation; resuming a finished, evaluated run touches nothing."""
    out = tmp_path / "run"
    assert main(tiny(sample_records, out, "--epochs", "1", "--epoch-steps", "1", "--batch-size", "2")) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    (out / "eval.json").unlink()                                      # as if killed during it
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "eval.json").read_text()) == evaluated   # the same weights, the same errors
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert f"train: {out} has finished its --epochs 1 (step 1)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_max_steps_mid_epoch_then_resume_continues_bitwise(sample_records, tmp_path, capsys):
    """The real loader and AlexNet: a stop after step 3 of 4 (mid-epoch 2), resumed, gives bitwise
    the weights, momentum and metrics of the uninterrupted run (the loader replays epoch 2's first batch).
    A plain --resume keeps the saved --max-steps: it says how to go on and touches nothing."""
    common = ["--batch-size", "2", "--epoch-steps", "2", "--no-final-eval", "--seed", "3", "--warmup-steps", "3",
              "--epochs", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(tiny(sample_records, full, *common)) == 0
    assert main(tiny(sample_records, part, *common, "--max-steps", "3")) == 0
    assert (ckpt.load(part / "last.pt")["epoch"], ckpt.load(part / "last.pt")["batch"]) == (1, 1)
    before = {p.name: p.read_bytes() for p in part.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(part), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"train: {part} is at step 3, its --max-steps 3; continue with a larger --max-steps N, or --max-steps none" \
        in said and "done" not in said
    assert {p.name: p.read_bytes() for p in part.iterdir() if p.is_file()} == before
    assert main(["--resume", str(part / "last.pt"), "--max-steps", "none", "--no-progress"]) == 0
    a, b = ckpt.load(full / "last.pt"), ckpt.load(part / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for k, buf in a["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "epoch_seconds")}
    la = [strip(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [strip(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 2


def test_sigterm_mid_epoch_saves_a_loadable_checkpoint(sample_records, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                             *tiny(sample_records, out, "--epochs", "1", "--batch-size", "2", "--log-every", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines = []
    watchdog = threading.Timer(300, proc.kill)     # a run that never logs a step must not stall the suite
    watchdog.start()
    for line in proc.stdout:                       # wait for the first step's line: mid-epoch for sure
        lines.append(line)
        if line.startswith("epoch 1/1  batch"):
            break
    watchdog.cancel()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "SIGTERM received" in text and f"--resume {out}" in text
    state = ckpt.load(out / "last.pt")
    per_epoch = json.loads((sample_records / "meta.json").read_text())["counts"]["train"] // 2
    # mid-epoch: epoch 0 not finished, at least one batch done
    assert state["epoch"] == 0 and 1 <= state["batch"] == state["step"] < per_epoch
    assert not list(out.glob(".*.tmp"))            # no half-written file left behind


def test_resume_with_another_out_is_refused(smoke_run, tmp_path, capsys):
    """--out beside --resume would be ignored (the run continues in its own folder): a user who
    meant to branch the run would overwrite the original's last.pt."""
    _, out = smoke_run
    before = (out / "last.pt").read_bytes()
    assert main(["--resume", str(out), "--out", str(tmp_path / "fork"), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"a resumed run continues in its own folder ({out})" in err
    assert (out / "last.pt").read_bytes() == before and not (tmp_path / "fork").exists()


def test_resume_on_other_records_is_refused_mid_epoch(sample_records, tmp_path, capsys):
    """A run resumed on records with other classes (here: two names swapped, the same images)
    would train its outputs towards other meanings; one line, exit 2, the run untouched."""
    out = tmp_path / "run"
    assert main(tiny(sample_records, out, "--epochs", "1", "--max-steps", "1", "--no-final-eval")) == 0
    other = tmp_path / "other"
    shutil.copytree(sample_records, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["classes"][0], meta["classes"][1] = meta["classes"][1], meta["classes"][0]
    (other / "meta.json").write_text(json.dumps(meta))
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["--resume", str(out), "--records", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on records with other classes" in err
    assert (out / "last.pt").read_bytes() == before


def test_check_records_counts():
    """Another train count: refused mid-epoch (the rest of the epoch's permutation would not be
    the rest of the one begun), said and accepted at an epoch's end; same records pass silently."""
    from engine.report import Reporter
    from engine.resume import check_records
    from engine.session import RunError, new_state
    cfg = parse_train_args(["--gpus", ""])
    lines = []
    say = Reporter(True, False)
    say.line = lines.append
    state = new_state(cfg, 1)
    state.records = {"train": 1000, "classes": "abc"}
    check_records(state, {"train": 1000, "classes": "abc"}, Path("r/last.pt"), Path("rec"), say)
    assert lines == []
    state.batch = 3
    with pytest.raises(RunError, match="saved mid-epoch .* on 1000 train records, but rec holds 989"):
        check_records(state, {"train": 989, "classes": "abc"}, Path("r/last.pt"), Path("rec"), say)
    state.batch = 0
    check_records(state, {"train": 989, "classes": "abc"}, Path("r/last.pt"), Path("rec"), say)
    assert lines == ["train: rec holds 989 train records, the run so far read 1000; the epochs from here on read these"]


def test_cli_errors(sample_records, tmp_path, capsys):
    assert main(tiny(tmp_path / "nope", tmp_path / "r1")) == 2
    assert "nope: records folder does not exist" in capsys.readouterr().err
    visible = torch.cuda.device_count()
    assert main(["--records", str(sample_records), "--gpus", str(visible), "--out", str(tmp_path / "r2")]) == 2
    assert f"--gpus '{visible}' names GPU {visible}, but {visible} GPU(s) are visible" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: no such checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--records", str(sample_records), "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()     # nothing half-written


def _one_error_line(capsys, expected: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_out_that_is_a_file_is_one_error(sample_records, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(tiny(sample_records, tmp_path / "file")) == 2
    _one_error_line(capsys, f"{tmp_path / 'file'}: exists and is not a folder")
    assert main(tiny(sample_records, tmp_path / "file" / "run")) == 2      # ENOTDIR from mkdir
    _one_error_line(capsys, "Not a directory")


@pytest.fixture(scope="module")
def small_state(smoke_run):
    """The smoke run's checkpoint without its (large) weights and momentum: every check below
    fails before they would be loaded, so they need not be written again and again."""
    state = ckpt.load(smoke_run[1] / "last.pt")
    state.pop("format")
    return {**state, "model": {}, "optimizer": {"state": {}, "param_groups": []}}


def _checkpoint(state, path, **changes):
    state = dict(state)
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    ckpt.save(path, state)
    return path


@pytest.mark.parametrize("change, message", [
    ({"optimizer": None, "history": None}, "incomplete checkpoint, missing optimizer, history"),
    ({"config": "not a dict"}, "its saved config is not valid here"),
    ({"config": {"lr": "nan"}}, "its saved config is not valid here"),
    ({"config": {"no_such_flag": 1}},
     "its saved config is not valid here: unknown config key(s) for TrainConfig: no_such_flag"),
    ({"model": {"fc": torch.zeros(1)}}, "does not fit this model or run"),
])
def test_bad_checkpoints_are_one_error(small_state, tmp_path, capsys, change, message):
    if isinstance(change.get("config"), dict):
        change = {"config": {**small_state["config"], **change["config"]}}
    path = _checkpoint(small_state, tmp_path / "run" / "last.pt", **change)
    assert main(["--resume", str(path), "--no-progress"]) == 2
    _one_error_line(capsys, f"{path}: {message}")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 visible GPUs")
def test_resume_on_fewer_gpus_than_saved_is_one_error(small_state, tmp_path, capsys):
    config = {**small_state["config"], "gpus": "0,1"}
    path = _checkpoint(small_state, tmp_path / "run" / "last.pt", config=config)
    assert main(["--resume", str(path), "--no-progress"]) == 2
    visible = torch.cuda.device_count()
    _one_error_line(capsys, f"saved with --gpus '0,1', but {visible} GPU(s) are visible here; pass --gpus")


def test_config_json_gives_the_runs_flags_back(smoke_run, sample_records):
    """--config RUN/config.json starts a new run with that run's flags (in a new run folder)."""
    _, out = smoke_run
    flags = parse_train_args(tiny(sample_records, out, *SMOKE))
    assert parse_train_args(["--config", str(out / "config.json")]) == replace(flags, out=None)
