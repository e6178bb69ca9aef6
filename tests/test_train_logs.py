"""Logs an unattended run can be followed by: plain step lines when stdout is not a terminal,
rich tables at 100 columns there, TensorBoard scalars and the conv1 image. The engine runs on
test_train_engine's fake loader with a tiny net (well under a second a run)."""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from engine import checkpoint as ckpt
from engine import logs
from engine import report
from engine import resume as resuming
from engine import run as R
from engine import session as S
from engine.distributed import DistInfo
from engine.loop import LoopSettings, Precision
from engine.recipe import make_optimizer
from engine.report import Reporter, crops_table, epochs_table
from test_train_engine import CPU, FakeLoader, config

EPOCH = 20                       # batches per epoch here (the loss read-back is every 10 steps)
LINE = re.compile(r"^epoch (\d+)/(\d+)  batch +(\d+)/(\d+) \( *([\d.]+)%\)  step (\d+)  loss ([\d.]+)  "
                  r"([\d.]+) img/s  lr (\S+)  eta epoch (\d+:\d\d:\d\d)  run (\d+:\d\d:\d\d)$")


class TowerNet(nn.Module):
    """A net with AlexNet's ``towers[i].conv1`` (so the conv1 image is drawn), 2x2 inputs."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList([nn.Module()])
        self.towers[0].conv1 = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.towers[0].conv1(x)).flatten(1))


class Data:
    def __init__(self, cfg):
        self.cfg = cfg

    def train(self, epoch):
        return FakeLoader(1000 * self.cfg.seed + epoch, EPOCH, self.cfg.batch_size)

    def val(self, view):
        return FakeLoader(99, 2, 3, views=10 if view == "tencrop" else 1)


def session(out: Path, cfg, say: Reporter | None = None) -> S.Session:
    torch.manual_seed(cfg.seed)
    net = TowerNet()
    out.mkdir(parents=True, exist_ok=True)
    return S.Session(cfg=cfg, info=DistInfo(), devices=["cpu"], out=out, say=say or Reporter(True, True),
                     data=Data(cfg), classes=5, net=net, model=net, optimizer=make_optimizer(net, cfg),
                     settings=LoopSettings(CPU, check_every=logs.read_back_every(cfg.log_every)),
                     precision=Precision("none", CPU))


def resume(out: Path, cfg) -> int:
    s = session(out, cfg)
    state = S.new_state(cfg, 1)
    resuming.restore(s, state, ckpt.load(out / "last.pt", keys=resuming.RESUME_KEYS), out / "last.pt", lr_given=False)
    return R.run_session(s, state)


def step_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_step_lines_without_a_terminal(tmp_path, capsys):
    """capsys's stdout is no terminal: no bar, a line every 10 steps, one line per validation."""
    assert R.run_session(session(tmp_path, cfg := config(log_every=10)), S.new_state(cfg, 1)) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\r" not in text                   # no ANSI escapes, no bar redraws
    lines = step_lines(text)
    assert [int(m[6]) for m in lines] == [10, 20, 30, 40]             # global steps
    assert [(m[1], m[3], m[4], m[5]) for m in lines] == [("1", "10", "20", "50.0"), ("1", "20", "20", "100.0"),
                                                          ("2", "10", "20", "50.0"), ("2", "20", "20", "100.0")]
    assert {m[2] for m in lines} == {"2"} and {m[9] for m in lines} == {"0.05"}   # epochs; lr after the warm-up
    assert (lines[1][10], lines[3][10]) == ("0:00:00",) * 2                     # nothing left at the ends
    # the run's remainder still holds one epoch end (validation, checkpoint), timed on the wall
    # clock, so only its form is fixed (an fsync stall on a shared disk can take seconds)
    assert re.fullmatch(r"\d+:\d\d:\d\d", lines[3][11])
    assert all(float(m[8]) > 0 for m in lines)
    # each line's loss is the mean of its 10 steps: an epoch's two lines average to its loss
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for epoch, m in enumerate(history):
        halves = [float(x[7]) for x in lines[2 * epoch: 2 * epoch + 2]]
        assert sum(halves) / 2 == pytest.approx(m["train_loss"], abs=1e-4)
    assert len(re.findall(r"^  val center: 6 images in [\d.]+ s", text, re.M)) == 2


def test_fewer_than_10_steps_a_line_reads_back_that_often(tmp_path, capsys):
    assert [logs.read_back_every(n) for n in (None, 0, 1, 7, 10, 25, 50)] == [10, 10, 1, 7, 10, 10, 10]
    assert R.run_session(session(tmp_path, cfg := config(epochs=1, log_every=4)), S.new_state(cfg, 1)) == 0
    lines = step_lines(capsys.readouterr().out)       # LINE needs a number after "loss": none is "-"
    assert [int(m[6]) for m in lines] == [4, 8, 12, 16, 20]
    history = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert sum(float(m[7]) for m in lines) / 5 == pytest.approx(history["train_loss"], abs=1e-4)


def test_default_is_every_50_steps_and_0_is_never(tmp_path, capsys):
    cfg = config(epochs=3)                                            # 60 steps, no --log-every
    assert R.run_session(session(tmp_path / "a", cfg), S.new_state(cfg, 1)) == 0
    assert [int(m[6]) for m in step_lines(capsys.readouterr().out)] == [50]
    cfg = config(log_every=0)
    assert R.run_session(session(tmp_path / "b", cfg), S.new_state(cfg, 1)) == 0
    assert step_lines(capsys.readouterr().out) == []


def test_without_a_terminal_a_line_after_the_first_step_then_by_steps_or_the_clock(tmp_path, capsys, monkeypatch):
    """An epoch shorter than --log-every must not leave a log file silent: the first line comes
    right after the first step, the next after N steps or LINE_SECONDS, whichever comes first;
    validation passes report the same way."""
    cfg = config(epochs=2)                                            # 40 steps, --log-every 50
    assert R.run_session(session(tmp_path / "a", cfg), S.new_state(cfg, 1)) == 0
    text = capsys.readouterr().out
    assert [x.split("  step ")[1].split()[0] for x in text.splitlines() if "  step " in x] == ["1"]
    assert re.search(r"^epoch 1/2  batch  1/20 \(  5.0%\)  step 1  loss -  [\d.]+ img/s", text, re.M)
    monkeypatch.setattr(logs, "LINE_SECONDS", 0.0)                    # the clock: a line every step
    assert R.run_session(session(tmp_path / "b", cfg), S.new_state(cfg, 1)) == 0
    text = capsys.readouterr().out
    assert [int(x.split("  step ")[1].split()[0]) for x in text.splitlines() if "  step " in x] == list(range(1, 41))
    # each validation pass: 2 batches of 3 images, a line after each, then its summary
    assert re.findall(r"^  val center: (\d)/6 images", text, re.M) == ["3", "6"] * 2


def test_in_a_terminal_the_bar_and_only_explicit_lines(tmp_path, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(report, "make_console", lambda **kw: Console(file=buf, force_terminal=True, width=120, **kw))
    cfg = config(epochs=3)
    assert R.run_session(session(tmp_path / "a", cfg, Reporter(True, True)), S.new_state(cfg, 1)) == 0
    text = buf.getvalue()
    assert "\x1b[" in text and not step_lines(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text))   # a bar, no lines
    buf.seek(0), buf.truncate()
    cfg = config(log_every=20)
    assert R.run_session(session(tmp_path / "b", cfg, Reporter(True, True)), S.new_state(cfg, 1)) == 0
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).replace("\r", "\n")
    assert sorted({int(m[6]) for m in step_lines(plain)}) == [20, 40]    # printed above the bar


def test_tables_fit_100_columns_without_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    say = Reporter(True, True)
    assert not say.console.is_terminal and not say.show_progress and say.console.width == 100
    m = {"epoch": 1, "lr": 0.01, "train_loss": 6.9, "train_top1_err": 0.999, "train_top5_err": 0.99,
         "val_top1_err": 0.998, "val_top5_err": 0.98, "images_per_s": 12345.6}
    say.table(epochs_table([m]))
    v = {"images": 50000, "top1_err": 0.4, "top5_err": 0.2}
    say.table(crops_table(v, v, 1000))
    lines = capsys.readouterr().out.splitlines()
    # at rich's default 80 columns the header breaks into "train" / "loss" on two rows
    assert any(re.search(r"epoch \S+ +lr \S+ +train loss \S+ +train top-1", x) for x in lines)
    # a title wider than its table is one line of its own, not folded to the table's width
    assert ("Validation error, 50000 images, 1000 classes (the paper's Table 1 style: single-crop vs "
            "10-crop softmax voting)") in lines
    assert all(len(x) <= 100 for x in lines if not x.startswith("Validation error"))
    monkeypatch.setenv("COLUMNS", "132")
    assert Reporter(True, True).console.width == 132


def test_tensorboard_missing_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # as if not installed
    assert R.main(["--records", str(tmp_path / "records"), "--gpus", "", "--out", str(tmp_path / "run"),
                   "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensorboard needs the tensorboard package") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exc:
        R.main(["--log-every", "-1"])
    assert exc.value.code == 2 and "--log-every must be an integer >= 0" in capsys.readouterr().err


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    found = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    found["conv1"] = [(e.step, (e.width, e.height)) for e in acc.Images("conv1")] if "conv1" in acc.Tags()["images"] else []
    return found


def test_tensorboard_scalars_and_conv1_and_no_duplicate_steps_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = config(log_every=10, tensorboard=True, profile=True, profile_warmup=0, profile_window=0)
    assert R.run_session(session(tmp_path / "full", cfg), S.new_state(cfg, 1)) == 0
    full = scalars(tmp_path / "full")
    history = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_top1_err", "train_top5_err", "val_loss", "val_top1_err", "val_top5_err",
                "lr", "images_per_s"):
        assert full[f"epoch/{key}"] == [(20, pytest.approx(history[0][key])), (40, pytest.approx(history[1][key]))]
    assert [s for s, _ in full["step/loss"]] == [10, 20, 30, 40]
    assert full["step/lr"] == [(s, pytest.approx(0.05)) for s in (10, 20, 30, 40)]
    assert [s for s, _ in full["profile/data_stall_percent"]] == [20, 40]
    assert {f"profile/{p}_ms_per_step" for p in ("data", "h2d", "forward", "backward", "optimizer")} <= set(full)
    assert full["conv1"] and [s for s, _ in full["conv1"]] == [20, 40]
    # a run stopped at step 25 whose process went on writing (as a SIGKILL after the checkpoint
    # leaves it), then resumed: TensorBoard shows each step once, the resumed run's values
    part = tmp_path / "part"
    assert R.run_session(session(part, cfg2 := config(log_every=10, tensorboard=True, max_steps=25)),
                         S.new_state(cfg2, 1)) == 0
    from torch.utils.tensorboard import SummaryWriter
    before = set((part / "tensorboard").iterdir())
    with SummaryWriter(str(part / "tensorboard")) as stale:
        for step in (30, 40):
            stale.add_scalar("step/loss", 999.0, step)
    # TensorBoard reads event files in name order (events.out.tfevents.SECONDS.HOST.PID.N, N not
    # zero-padded): date the stale file a second back, as the killed process's file would be, so
    # the order does not hang on how many writers this test process made before
    (new_file,) = set((part / "tensorboard").iterdir()) - before
    fields = new_file.name.split(".")
    fields[3] = str(int(fields[3]) - 1)
    new_file.rename(new_file.with_name(".".join(fields)))
    assert resume(part, config(log_every=10, tensorboard=True)) == 0
    got = scalars(part)
    assert [s for s, _ in got["step/loss"]] == [10, 20, 30, 40]
    assert got["step/loss"][:2] == full["step/loss"][:2] and all(v < 999 for _, v in got["step/loss"])
    assert got["epoch/val_top1_err"] == full["epoch/val_top1_err"]      # resume is bitwise: the same values


def test_duration_and_steps_left():
    assert [logs.duration(x) for x in (0, 59.6, 3600, 86400 + 3 * 3600 + 7)] == \
        ["0:00:00", "0:01:00", "1:00:00", "1d 03:00:07"]
    state = S.new_state(config(), 1)
    state.epoch, state.batch, state.step = 1, 5, 105           # epoch 2 of 4, 100 batches an epoch
    assert logs.steps_left(state, 100, 4, None) == (95 + 200, 3)
    assert logs.steps_left(state, 100, 4, 150) == (45, 0)      # --max-steps ends it mid-epoch 2
    assert logs.steps_left(state, 100, 4, 250) == (145, 1)


def test_line_numbers_on_two_ranks(monkeypatch, capsys):
    """Rates and ETAs from a fixed clock: 50 steps of 128 images on each of 2 ranks in 10 s."""
    clock = [100.0]
    monkeypatch.setattr(logs, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    log = logs.RunLog(Reporter(True, False), epochs=90, max_steps=None, world=2, lines_every=50, scalars_every=0)
    log.epoch_end_seconds = 5.0                      # validation + checkpoint of the last epoch
    log.timed = False                                # only the every-50-steps line (the clock's: tested above)
    state = S.new_state(config(), 2)
    state.epoch, state.step = 3, 300                 # epoch 4 of 90, 100 batches an epoch
    state.read_step = 300
    on_step = log.epoch_steps(state, 100, 128, lambda: 0.001)
    for _ in range(50):
        clock[0] += 0.2
        state.count_step()
        if state.step % 10 == 0:                     # the loop's read-back: losses of 2.0 each
            state.sums.loss, state.sums.images = state.sums.loss + 10 * 2.0, state.sums.images + 10 * 128
            state.read_step = state.step
        on_step(state)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch")]
    # 50 x 128 x 2 images / 10 s; epoch: 50 steps x 0.2 s; run: (50 + 86 x 100) x 0.2 s + 87 x 5 s = 2165 s
    assert line == ("epoch 4/90  batch  50/100 ( 50.0%)  step 350  loss 2.0000  1280.0 img/s (640.0/rank)  "
                    "lr 0.001  eta epoch 0:00:10  run 0:36:05")
