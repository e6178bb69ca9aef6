"""The loop's loss read-back through common.devices.HostCopy. On a GPU the span just finished is
still being copied at the read-back, so the host reads the span before it: one span behind the
device, never draining its queue. ``LateCopy`` plays that GPU on the CPU (its copy is never ready
before it is asked for); with it the run must end bitwise the run read at once, a NaN must be
named exactly (found one span later), and step lines must count the steps actually read."""
from __future__ import annotations

import json
import re

import pytest

from common.devices import HostCopy
from engine import loop
from engine import run as R
from engine import session as S
from engine.config import TrainConfig
from engine.loop import NonFiniteLoss, StepHooks, StepPlan, train_steps
from engine.recipe import make_optimizer
from test_train_engine import assert_same_tensors, config, metrics, resume, start
from test_train_logs import session as log_session
from test_train_units import CPU, _batches, _hooks, _state, _tiny


class LateCopy(HostCopy):
    """A GPU's copy: not ready when the read-back that queued it looks."""

    def ready(self) -> bool:
        return False


@pytest.fixture
def late(monkeypatch):
    monkeypatch.setattr(loop, "HostCopy", LateCopy)


@pytest.mark.parametrize("lagged, left", [(False, 10), (True, 0)])
def test_a_nan_loss_is_named_exactly_at_most_one_span_late(lagged, left, monkeypatch):
    """Global steps 101-130, a NaN loss at step 114 (read back every 10 steps): read at once it
    is found at step 120, read a span behind at step 130; both name step 114."""
    if lagged:
        monkeypatch.setattr(loop, "HostCopy", LateCopy)
    net = _tiny()
    batches = iter(list(_batches(30, bad_at=13)))
    with pytest.raises(NonFiniteLoss) as exc:
        train_steps(net, make_optimizer(net, TrainConfig()), batches, _state(step=100),
                    StepPlan(epoch_batches=30), CPU, _hooks())
    assert exc.value.step == 114 and len(list(batches)) == left


def test_the_sums_lag_a_span_and_the_end_reads_everything(late):
    net = _tiny()
    state, seen = _state(), []
    train_steps(net, make_optimizer(net, TrainConfig()), iter(list(_batches(25))), state, StepPlan(epoch_batches=25),
                CPU, _hooks(after_step=lambda st: seen.append((st.step, st.read_step, st.sums.images)) or False))
    assert seen[9] == (10, 0, 0) and seen[19] == (20, 10, 40) and seen[24] == (25, 10, 40)
    assert (state.read_step, state.sums.images) == (25, 100)          # the final read-back: every step


def test_a_lagged_run_is_bitwise_the_run_read_at_once_and_resumes_so(tmp_path, monkeypatch):
    """Two epochs read at once vs read a span behind, and the lagged one stopped by --max-steps
    mid-epoch and resumed: the same weights, momentum, sums and metrics.jsonl."""
    assert start(tmp_path / "now", config()) == 0
    monkeypatch.setattr(loop, "HostCopy", LateCopy)
    assert start(tmp_path / "late", config()) == 0
    assert_same_tensors(tmp_path / "now" / "last.pt", tmp_path / "late" / "last.pt")
    assert metrics(tmp_path / "now") == metrics(tmp_path / "late")
    assert start(tmp_path / "cut", config(max_steps=7)) == 0
    assert resume(tmp_path / "cut", config()) == 0
    assert_same_tensors(tmp_path / "now" / "last.pt", tmp_path / "cut" / "last.pt")
    assert metrics(tmp_path / "now") == metrics(tmp_path / "cut")


LOSS = re.compile(r"^epoch \S+  batch +\S+ \(.*?\)  step (\d+)  loss (\S+)  ", re.M)


def test_step_lines_count_the_steps_read(tmp_path, capsys, monkeypatch):
    """A line shows the loss of the steps read since the line before: read a span behind, the
    line at step 20 shows what the line at step 10 shows when read at once (steps 1-10), and
    the first line of each epoch has nothing read yet ('-'). Without a bar a line also follows
    the process's first step, before any read-back in either mode."""
    cfg = config(log_every=10)
    assert R.run_session(log_session(tmp_path / "now", cfg), S.new_state(cfg, 1)) == 0
    now = dict(LOSS.findall(capsys.readouterr().out))
    monkeypatch.setattr(loop, "HostCopy", LateCopy)
    assert R.run_session(log_session(tmp_path / "late", cfg), S.new_state(cfg, 1)) == 0
    late = dict(LOSS.findall(capsys.readouterr().out))
    assert set(now) == set(late) == {"1", "10", "20", "30", "40"}
    assert (now["1"], late["1"], late["10"], late["30"]) == ("-", "-", "-", "-")
    assert (late["20"], late["40"]) == (now["10"], now["30"])
    assert json.loads((tmp_path / "now" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"] == \
        json.loads((tmp_path / "late" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]


@pytest.mark.gpu
def test_gpu_read_back_sums_every_loss_and_the_model_rate_leaves_the_net_alone():
    """On CUDA: the spans read through pinned copies cover every step once the loop returns, and
    the in-loop model rate (bf16) trains a copy only."""
    import torch
    from torch import nn
    from engine.loop import LoopSettings, model_rate
    from engine.precision import Precision
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to(dev)
    opt = make_optimizer(net, TrainConfig())
    data = list(_batches(25))
    state = _state()
    hooks = StepHooks(precision=Precision("none", dev))
    train_steps(net, opt, iter(data), state, StepPlan(epoch_batches=25), LoopSettings(dev, check_every=10), hooks)
    assert (state.read_step, state.sums.images) == (25, 100)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = data[0][0].to(dev), data[0][1].to(dev)
    rate = model_rate(net, opt, Precision("bf16", dev), (x, y), steps=5)
    assert rate["steps"] == 5 and rate["images_per_s"] > 0
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
