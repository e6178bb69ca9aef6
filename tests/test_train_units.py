"""The training engine's pieces, checked against the paper on hand-made inputs (no DALI, no AlexNet)."""
from __future__ import annotations

import math
import pickle
import time

import pytest
import torch
from torch import nn

from engine import checkpoint as ckpt
from engine.config import DEMO, TrainConfig, merge_explicit, parse_train_args
from engine.loop import EpochSums, LoopSettings, NonFiniteLoss, StepHooks, evaluate, train_one_epoch
from engine.profiling import PHASES, Phases
from engine.recipe import make_optimizer, param_groups
from engine.run import epoch_seed, stop_poll
from engine.schedule import PlateauSchedule, lr_at
from engine.voting import topk_counts, vote

CPU = LoopSettings(input_device=torch.device("cpu"))


# --- 10-crop voting -----------------------------------------------------------------------

def test_vote_averages_softmax_not_logits():
    # One image, 10 views, 3 classes. Nine views mildly prefer class 1 (logits 0, 1, 0);
    # one view is wildly confident in class 0 (logit 20). Mean logits: class 0 = 2.0 vs
    # class 1 = 0.9 -> class 0. Mean softmax: class 1 gets 9/10 * 0.576 ≈ 0.52 vs class 0's
    # ≈ 0.1 + 9/10 * 0.212 ≈ 0.29 -> class 1, the paper's answer.
    views = torch.zeros(1, 10, 3)
    views[0, :9, 1] = 1.0
    views[0, 9, 0] = 20.0
    probs = vote(views)
    mild = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)
    expected = (9 * mild + torch.tensor([1.0, 0.0, 0.0])) / 10    # softmax of (20,0,0) is 1,0,0 to 1e-8
    assert torch.allclose(probs[0], expected, atol=1e-6)
    assert probs.argmax(1).item() == 1
    assert views.mean(1).argmax(1).item() == 0       # averaging logits would have answered 0
    assert torch.allclose(probs.sum(1), torch.ones(1))


def test_vote_rejects_wrong_shape():
    with pytest.raises(ValueError, match="batch, views, classes"):
        vote(torch.zeros(10, 3))


def test_topk_counts():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3, 0.05],    # order: 3,1,5,2,0,6,4
                           [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])    # order: 0,6,5,4,3,2,1
    labels = torch.tensor([0, 1])
    # row 0: label 0 is 5th -> top-5 hit, not top-1; row 1: label 1 is last -> miss both
    assert topk_counts(scores, labels).tolist() == [0, 1]
    assert topk_counts(scores, torch.tensor([3, 0])).tolist() == [2, 2]
    # fewer classes than k: k is clipped, every label is in the "top 5" of 4 classes
    four = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3)
    assert topk_counts(four, torch.tensor([0, 1, 3])).tolist() == [1, 3]


# --- the learning-rate schedule -----------------------------------------------------------

def test_lr_drops_after_patience_plateau_epochs_and_not_before():
    s = PlateauSchedule(lr=0.01, patience=3, threshold=0.001)
    errors = [0.90, 0.80, 0.70, 0.70, 0.6995, 0.70]   # improves 3x, then 3 epochs without a 0.1-point gain
    drops = [s.step(e) for e in errors]
    assert drops == [False, False, False, False, False, True]
    assert s.lr == pytest.approx(0.001) and s.drops == 1 and s.best == 0.70
    # the count restarts after a drop: two more flat epochs do nothing, the third drops again
    assert [s.step(0.70) for _ in range(3)] == [False, False, True]
    assert s.lr == pytest.approx(0.0001)


def test_lr_no_drop_while_improving_and_counter_resets():
    s = PlateauSchedule(lr=0.01, patience=2, threshold=0.0)
    # bad, improve, bad, improve...: never two bad in a row
    for e in [0.5, 0.6, 0.4, 0.45, 0.3, 0.35, 0.2]:
        assert not s.step(e)
    assert s.lr == 0.01


def test_schedule_state_round_trip():
    s = PlateauSchedule(lr=0.01, patience=1)
    s.step(0.5), s.step(0.5)
    t = PlateauSchedule(lr=1.0)
    t.load_state_dict(s.state_dict())
    assert t == s and t.lr == pytest.approx(0.001)


def test_lr_at_linear_warmup():
    # step k (1-based, after k-1 done) gets lr * k / warmup until warmup, then lr
    assert [lr_at(0.01, done, 4) for done in range(6)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert lr_at(0.01, 0, 0) == 0.01          # no warm-up: the schedule's lr from the first step


# --- the recipe: the paper's update rule vs torch.optim.SGD -------------------------------

def test_torch_sgd_equals_the_papers_rule_at_constant_lr():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    cfg = TrainConfig(lr=0.01, momentum=0.9, weight_decay=0.0005)
    opt = make_optimizer(net, cfg)
    w = [p.detach().clone().double() for p in net.parameters()]
    v = [torch.zeros_like(x) for x in w]
    for _ in range(5):
        x = torch.randn(4, 3)
        opt.zero_grad()
        (net(x) ** 2).sum().backward()
        grads = [p.grad.detach().double() for p in net.parameters()]
        opt.step()
        # the paper: v <- 0.9 v - 0.0005 eps w - eps dL/dw ; w <- w + v  (all w, biases too)
        v = [0.9 * vi - 0.0005 * 0.01 * wi - 0.01 * gi for vi, wi, gi in zip(v, w, grads)]
        w = [wi + vi for wi, vi in zip(w, v)]
        for p, wi in zip(net.parameters(), w):
            assert torch.allclose(p.detach().double(), wi, rtol=0, atol=1e-7)


def test_bias_decay_switch():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2))
    assert [len(g["params"]) for g in param_groups(net, 5e-4, decay_biases=True)] == [4]
    groups = param_groups(net, 5e-4, decay_biases=False)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 5e-4), (2, 0.0)]
    assert all(p.ndim == 1 for p in groups[1]["params"])


# --- config and CLI parsing ---------------------------------------------------------------

def test_demo_preset_and_explicit_flags_win():
    cfg = parse_train_args(["--demo"])
    for key, value in DEMO.items():
        assert getattr(cfg, key) == value
    cfg = parse_train_args(["--demo", "--epochs", "7", "--towers=2", "--dropout", "0.5"])
    assert (cfg.epochs, cfg.towers, cfg.dropout, cfg.batch_size) == (7, 2, 0.5, DEMO["batch_size"])
    # without --demo, the paper's defaults
    cfg = parse_train_args([])
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs, cfg.towers, cfg.init,
            cfg.dropout) == (128, 0.01, 0.9, 0.0005, 90, 2, "paper", 0.5)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0,x"], "--gpus must be a comma list"),
    (["--gpus", "1,1"], "names a GPU twice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--checkpoint", "x.pt"], "--checkpoint is for --eval-only"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--amp", "fp8"], "invalid choice"),
])
def test_cli_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_merge_applies_only_explicit_flags():
    saved = TrainConfig(epochs=2, lr=0.02, batch_size=4)
    argv = ["--resume", "r", "--epochs", "4"]
    merged, lines = merge_explicit(saved, argv, parse_train_args(argv))
    assert (merged.epochs, merged.lr, merged.batch_size, merged.resume) == (4, 0.02, 4, "r")
    assert lines == ["epochs: 2 -> 4"]


def test_epoch_seed_is_a_fixed_function():
    assert epoch_seed(0, 3) == epoch_seed(0, 3)
    assert len({epoch_seed(0, e) for e in range(50)} | {epoch_seed(1, 0)}) == 51


# --- checkpoints --------------------------------------------------------------------------

def test_checkpoint_round_trip_weights_only(tmp_path):
    net = nn.Linear(3, 2)
    state = {"model": net.state_dict(), "epoch": 2, "rng": [ckpt.rng_state()], "config": {"lr": 0.01}}
    ckpt.save(tmp_path / "last.pt", state)
    back = ckpt.load(tmp_path / "last.pt")
    assert back["epoch"] == 2 and torch.equal(back["model"]["weight"], net.weight)
    assert torch.equal(back["rng"][0]["cpu"], torch.get_rng_state())
    torch.load(tmp_path / "last.pt", weights_only=True)      # loads without trusting pickles
    ckpt.link(tmp_path / "last.pt", tmp_path / "best.pt")
    ckpt.save(tmp_path / "last.pt", {**state, "epoch": 3})
    assert ckpt.load(tmp_path / "best.pt")["epoch"] == 2      # best keeps its own bytes


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/SHOULD_NOT_EXIST_train_ckpt", "w"))


def test_checkpoint_truncated_and_foreign_files(tmp_path):
    ckpt.save(tmp_path / "ok.pt", {"epoch": 1})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="cut.pt: not a readable checkpoint"):
        ckpt.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")      # a torch file, not ours
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint of this project"):
        ckpt.load(tmp_path / "other.pt")
    torch.save({"format": ckpt.FORMAT, "evil": _Boom()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.load(tmp_path / "evil.pt")
    import os
    assert not os.path.exists("/tmp/SHOULD_NOT_EXIST_train_ckpt")     # the pickle never ran
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(tmp_path / "pickle.pt")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.load(tmp_path / "missing.pt")


# --- the epoch loop on a tiny model --------------------------------------------------------

def _tiny(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, classes))


def _batches(n, bad_at=None):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x = torch.randn(4, 3, 2, 2, generator=g)
        if i == bad_at:
            x[0, 0, 0, 0] = math.inf
        yield x, torch.randint(0, 3, (4,), generator=g)


def test_train_one_epoch_sums_and_caps():
    net = _tiny()
    opt = make_optimizer(net, TrainConfig(lr=0.1))
    sums = EpochSums()
    reason = train_one_epoch(net, iter(list(_batches(25))), opt, CPU, sums, first_step=1, max_batches=23)
    assert reason == "limit" and sums.batches == 23 and sums.images == 92
    assert 0 <= sums.top1 <= sums.top5 <= 92 and sums.loss > 0
    sums2 = EpochSums()
    assert train_one_epoch(net, iter(list(_batches(5))), opt, CPU, sums2, first_step=1) == "done"
    calls = []
    sums3 = EpochSums()
    reason = train_one_epoch(net, iter(list(_batches(5))), opt, CPU, sums3, first_step=1,
                             hooks=StepHooks(should_stop=lambda: len(calls) >= 2,
                                             on_step=lambda s, n: calls.append(n)))
    assert reason == "stopped" and sums3.batches == 2


def test_nonfinite_loss_names_the_step():
    net = _tiny()
    opt = make_optimizer(net, TrainConfig(lr=0.1))
    with pytest.raises(NonFiniteLoss) as exc:
        # global steps 101..: batch index 13 is step 114; checked every 10 steps, so found late
        train_one_epoch(net, iter(list(_batches(30, bad_at=13))), opt, CPU, EpochSums(), first_step=101)
    assert exc.value.step == 114 and "step 114" in str(exc.value)


def test_evaluate_votes_tencrop_batches():
    # a "model" that returns fixed logits per view, so the vote is known: see test_vote_*
    class Fixed(nn.Module):
        def forward(self, x):                   # x: (B*10, 3, 1, 1); channel 0 holds the view's id
            out = torch.zeros(x.shape[0], 3)
            out[:, 1] = 1.0
            out[x[:, 0, 0, 0] == 9, 0] = 20.0
            return out
    views = torch.arange(10.0).view(1, 10, 1, 1, 1).expand(2, 10, 3, 1, 1).clone()
    sums = evaluate(Fixed(), [(views, torch.tensor([1, 0]))], CPU)
    assert (sums["images"], sums["top1"], sums["top5"]) == (2, 1, 2)


def test_phases_summary():
    p = Phases(True, ["cpu"])
    for _ in range(2):
        for name in PHASES:
            with p(name):
                time.sleep(0.002)   # every phase takes real time, so the shares are meaningful
        p.count(8)
    s = p.summary()
    assert s["steps"] == 2 and s["images"] == 16
    # each phase was timed (2 ms of sleep each, per step), and the step is their sum
    assert all(v["ms_per_step"] >= 2.0 for v in s["phases"].values())
    assert s["step_ms"] == pytest.approx(sum(v["ms_per_step"] for v in s["phases"].values()))
    assert s["images_per_s"] == pytest.approx(16 / (s["step_ms"] * 2 / 1000))
    assert s["data_stall_percent"] == pytest.approx(100 * s["phases"]["data"]["ms_per_step"] / s["step_ms"])


def test_stop_poll_waits_for_a_shared_step_only_when_distributed():
    """One process reads the signal flag every step; ranks poll the collective every
    check_every steps, so all of them stop after the same step."""
    from types import SimpleNamespace as NS
    flag = type("Flag", (), {"__bool__": lambda self: True})()
    single = NS(info=NS(enabled=False), settings=NS(check_every=3), devices=["cpu"])
    assert stop_poll(single, flag)() is True
    ranks = NS(info=NS(enabled=True), settings=NS(check_every=3), devices=["cpu"])
    poll = stop_poll(ranks, flag)          # no process group here: any_rank is the local flag
    assert [poll() for _ in range(6)] == [False, False, True, False, False, True]
