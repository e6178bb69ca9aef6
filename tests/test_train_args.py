"""train.py's command line as a user meets it: grouped --help with each default once, the
short forms of the reference scripts, switches without made-up negations, and --config
giving a run's config.json back (explicit flags win)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from common.config import to_dict
from engine.config import DEMO, HELP_GROUPS, TrainConfig, merge_explicit, parse_command, parse_train_args

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def help_text() -> str:
    """What `python train.py --help` prints (train.py's examples are its description)."""
    return subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, check=True, env={**os.environ, "COLUMNS": "100"}).stdout


def help_entries(text: str) -> dict[str, str]:
    """Each option's help entry ('  -b, --batch-size N   images per ...' up to the next option)."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[\w-]+(?:, -[\w-]+)*)", line)
        if m:
            current = m.group(1).split(", ")[-1] if m.group(1).startswith("-") else None
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_groups_every_flag_under_its_heading(help_text):
    text = help_text
    titles = [line[:-1] for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert titles[-len(HELP_GROUPS):] == list(HELP_GROUPS)                  # in this order, no "other"
    grouped = [name for names in HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in fields(TrainConfig))   # each field exactly once
    sections = re.split(r"^(\S.*):$", text, flags=re.M)
    body = dict(zip(sections[1::2], sections[2::2]))
    for title, names in HELP_GROUPS.items():
        for name in names:
            assert re.search(rf"--(no-)?{name.replace('_', '-')}\b", body[title]), (title, name)
    assert "python train.py --demo" in text and "torchrun --nproc-per-node" in text   # the examples


def test_help_shows_each_default_once_and_never_none(help_text):
    entries = help_entries(help_text)
    assert len(entries) > 30
    for flag, entry in entries.items():
        assert len(re.findall(r"default:", entry)) <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    assert "(default: 128)" in entries["--batch-size"] and entries["--batch-size"].startswith("  -b, --batch-size N")
    assert "(default: 0.0005)" in entries["--wd"]
    assert "default: data/records" in entries["--records"]
    assert "(default: on)" in entries["--no-lrn"]
    assert "outputs of fc6 and fc7" in entries["--dropout"]    # the model applies dropout after them


@pytest.mark.parametrize("switch", ["demo", "eval_only", "profile", "compile", "channels_last", "auto_resume"])
def test_switches_that_are_only_turned_on_have_no_negation(switch, capsys):
    flag = switch.replace("_", "-")
    assert getattr(parse_train_args([]), switch) is False
    with pytest.raises(SystemExit) as exc:
        parse_train_args([f"--no-{flag}"])
    assert exc.value.code == 2 and f"unrecognized arguments: --no-{flag}" in capsys.readouterr().err


def test_negations_users_need_and_short_forms():
    cfg = parse_train_args(["--no-lrn", "--no-overlap-pool", "--no-decay-biases", "--no-final-eval",
                            "--no-progress", "-b", "64", "-j", "3", "--wd", "0.001"])
    assert (cfg.lrn, cfg.overlap_pool, cfg.decay_biases, cfg.final_eval, cfg.progress) == (False,) * 5
    assert (cfg.batch_size, cfg.workers, cfg.weight_decay) == (64, 3, 0.001)
    assert parse_train_args(["--batch-size=64", "--weight-decay", "0.001"]) == replace(
        TrainConfig(), batch_size=64, weight_decay=0.001)
    # a short form is as explicit as the long one: it wins over --demo's preset
    assert parse_train_args(["--demo", "-b", "8"]).batch_size == 8


def write_run_config(path: Path, cfg: TrainConfig, **resolved) -> Path:
    """config.json as a run writes it: every flag, plus what the run resolved."""
    path.write_text(json.dumps({**to_dict(cfg), "out": "runs/a", "devices": ["cuda:0", "cuda:1"],
                                "world": 8, "classes": 1000, **resolved}))
    return path


def test_config_file_round_trip_and_explicit_flags_win(tmp_path):
    cfg = TrainConfig(records="/data/records", batch_size=256, lr=0.02, lrn=False, towers=1, epochs=7,
                      amp="bf16", channels_last=True, gpus="0,1", decay_biases=False, seed=4, mean="pixel")
    path = write_run_config(tmp_path / "config.json", replace(cfg, out="runs/a", auto_resume=True))
    # the run folder is the old run's: a new run gets its own
    assert parse_train_args(["--config", str(path)]) == cfg
    got = parse_train_args(["--config", str(path), "--lr", "0.5", "-b", "32", "--out", "runs/b"])
    assert got == replace(cfg, lr=0.5, batch_size=32, out="runs/b")


def test_config_file_of_a_demo_run_and_the_preset(tmp_path):
    demo = replace(parse_train_args(["--demo", "--epochs", "5"]))
    path = write_run_config(tmp_path / "config.json", demo)
    assert parse_train_args(["--config", str(path)]) == demo
    # a hand-written partial file: the file wins over the preset, flags over the file
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"demo": True, "lr": 0.05, "epochs": 4}))
    got = parse_train_args(["--config", str(partial), "--epochs", "6"])
    assert (got.lr, got.epochs, got.batch_size, got.towers) == (0.05, 6, DEMO["batch_size"], DEMO["towers"])


@pytest.mark.parametrize("content, says", [
    ({"lr": 0.1, "lerning_rate": 0.1}, "unknown key(s) lerning_rate"),
    ({"batch_size": 0}, "--batch-size must be an integer >= 1"),
    ([1, 2], "expected a JSON object"),
    ("{not json", "Expecting property name"),
])
def test_config_file_errors_are_one_line(tmp_path, capsys, content, says):
    path = tmp_path / "c.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as exc:
        parse_train_args(["--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("train.py: error: ") and says in err[-1]
    if says.startswith("unknown"):
        assert str(path) in err[-1]


def test_config_and_resume_exclude_each_other(tmp_path, capsys):
    path = write_run_config(tmp_path / "config.json", TrainConfig())
    with pytest.raises(SystemExit):
        parse_train_args(["--config", str(path), "--resume", "runs/a"])
    assert "--config and --resume exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--auto-resume"], "--auto-resume needs --out DIR"),
    (["--auto-resume", "--out", "runs/a", "--resume", "runs/a"], "--auto-resume excludes --resume"),
])
def test_auto_resume_needs_out_and_no_resume(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_a_run_started_with_auto_resume_continues_with_resume_and_back():
    saved = TrainConfig(out="runs/a", auto_resume=True, epochs=7)
    argv = ["--resume", "runs/a", "--epochs", "9"]
    got, changes = merge_explicit(saved, *parse_command(argv))
    assert (got.resume, got.auto_resume, got.epochs) == ("runs/a", False, 9) and changes == ["epochs: 7 -> 9"]
    argv = ["--out", "runs/a", "--auto-resume"]
    got, changes = merge_explicit(replace(saved, auto_resume=False), *parse_command(argv))
    assert (got.resume, got.auto_resume, got.epochs) == (None, True, 7) and changes == []


def test_help_loads_neither_torch_nor_dali():
    """--help and a bad flag are answered before the heavy imports (they take seconds)."""
    code = ("import runpy, sys\n"
            "sys.argv = ['train.py', '--help']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0\n"
            "print(sorted(m for m in ('torch', 'nvidia.dali', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_preset_small_and_explicit_flags_over_it():
    from engine.config import PRESETS, parse_command
    cfg, given = parse_command(["--preset", "small", "--epochs", "12"])
    assert (cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.plateau_patience) == (32, 0.001, 30, 5)
    assert cfg.epochs == 12 and given == {"preset", "epochs"}
    assert (cfg.towers, cfg.dropout, cfg.gpus) == (2, 0.5, "auto")        # the paper's net, any device
    mine = parse_train_args(["--demo", "--preset", "small"])               # the preset over the demo's values
    assert (mine.epochs, mine.plateau_patience, mine.gpus) == (PRESETS["small"]["epochs"], 5, "")
