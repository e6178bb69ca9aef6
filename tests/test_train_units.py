"""The training engine's pieces, checked against the paper on hand-made inputs (no DALI, no AlexNet)."""
from __future__ import annotations

import json
import math
import pickle
import time

import pytest
import torch
from torch import nn

from engine import checkpoint as ckpt
from engine.config import DEMO, TrainConfig, merge_explicit, parse_command, parse_train_args
from engine.loop import LoopSettings, NonFiniteLoss, Precision, StepHooks, StepPlan, evaluate, train_steps
from engine.profiling import PHASES, Phases
from engine.recipe import loss_fn, make_optimizer, param_groups, set_hyperparameters
from engine.run import stop_poll
from engine.session import resolve_records
from engine.schedule import PlateauSchedule, lr_at
from engine.state import TrainState
from engine.voting import topk_counts, vote
from records.format import RecordsError

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


def test_plateau_rule_divides_at_most_max_drops_times():
    s = PlateauSchedule(lr=0.01, patience=1, threshold=0.0, max_drops=3)
    drops = [s.step(0.5) for _ in range(8)]          # one improvement, then seven flat epochs
    assert drops == [False, True, True, True, False, False, False, False]
    assert s.drops == 3 and s.lr == pytest.approx(1e-5)


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

@pytest.mark.parametrize("fused", [True, False])
def test_torch_sgd_equals_the_papers_rule_at_constant_lr(fused):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    cfg = TrainConfig(lr=0.01, momentum=0.9, weight_decay=0.0005)
    opt = make_optimizer(net, cfg, fused=fused)
    assert bool(opt.defaults["fused"]) == fused
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


def test_sgd_is_fused_where_torch_has_it_and_a_resume_keeps_it():
    net = nn.Linear(3, 2)
    opt = make_optimizer(net, TrainConfig())
    assert opt.defaults["fused"] is True and all(g["fused"] for g in opt.param_groups)   # CPU has it
    old = make_optimizer(net, TrainConfig(), fused=False)        # a checkpoint from an unfused run
    (net(torch.randn(2, 3)) ** 2).sum().backward()
    old.step()
    opt.load_state_dict(old.state_dict())
    assert not opt.param_groups[0]["fused"]                      # torch copies the saved groups' flags
    set_hyperparameters(opt, TrainConfig())
    assert all(g["fused"] for g in opt.param_groups)


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_scaler_skips_a_nonfinite_step_on_the_device_with_fused_sgd(fused):
    """GradScaler hands a fused SGD the inf flag (the step is skipped inside the kernel); the
    skip is still reported, the weights and momentum untouched, the scale halved; a finite
    step after it is the unscaled update."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = make_optimizer(net, TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0), fused=fused)
    precision = Precision("fp16", "cpu")
    before = [p.detach().clone() for p in net.parameters()]
    precision.backward((net(torch.randn(2, 3)) * float("inf")).sum())
    assert precision.step(opt).item() is True
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert precision.scale == 2.0 ** 15
    opt.zero_grad()
    x = torch.randn(2, 3)
    precision.backward(net(x).sum())
    grads = [p.grad / precision.scale for p in net.parameters()]
    assert precision.step(opt).item() is False
    for p, b, g in zip(net.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


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
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--amp", "fp8"], "invalid choice"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--momentum", "nan"], "--momentum must be a finite number in [0, 1)"),
    (["--momentum", "1"], "--momentum must be a finite number in [0, 1)"),
    (["--weight-decay=-inf"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--dropout", "nan"], "--dropout must be a finite number in [0, 1)"),
    (["--plateau-threshold", "nan"], "--plateau-threshold must be a finite number in [0, 1]"),
    (["--plateau-threshold", "-0.1"], "--plateau-threshold must be a finite number in [0, 1]"),
    (["--max-lr-drops", "-1"], "--max-lr-drops must be an integer >= 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
])
def test_cli_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1   # no usage block


def test_resume_merge_applies_only_explicit_flags():
    saved = TrainConfig(epochs=2, lr=0.02, batch_size=4)
    argv = ["--resume", "r", "--epochs", "4"]
    merged, lines = merge_explicit(saved, *parse_command(argv))
    assert (merged.epochs, merged.lr, merged.batch_size, merged.resume) == (4, 0.02, 4, "r")
    assert lines == ["epochs: 2 -> 4"]


# --- checkpoints --------------------------------------------------------------------------

def test_checkpoint_round_trip_weights_only(tmp_path):
    net = nn.Linear(3, 2)
    state = {"model": net.state_dict(), "epoch": 2, "step": 9, "rng": [ckpt.rng_state()], "config": {"lr": 0.01}}
    ckpt.save(tmp_path / "last.pt", state)
    back = ckpt.load(tmp_path / "last.pt")
    assert back["epoch"] == 2 and torch.equal(back["model"]["weight"], net.weight)
    assert torch.equal(back["rng"][0]["cpu"], torch.get_rng_state())
    torch.load(tmp_path / "last.pt", weights_only=True)      # loads without trusting pickles
    ckpt.link(tmp_path / "last.pt", tmp_path / "best.pt")
    ckpt.save(tmp_path / "last.pt", {**state, "epoch": 3})
    assert ckpt.load(tmp_path / "best.pt")["epoch"] == 2      # best keeps its own bytes


class _Boom:
    """Unpickling this would create ``path``: proof that a checkpoint load ran a pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_truncated_file_is_one_error(tmp_path):
    ckpt.save(tmp_path / "ok.pt", {"epoch": 1})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="cut.pt: not a readable checkpoint"):
        ckpt.load(tmp_path / "cut.pt", keys=("epoch",))


def test_checkpoint_of_another_program_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")      # a torch file, not ours
    with pytest.raises(ckpt.CheckpointError, match="other.pt: not a checkpoint of this project"):
        ckpt.load(tmp_path / "other.pt")


def test_checkpoint_load_never_runs_a_pickle(tmp_path):
    marker = tmp_path / "pickle_ran"
    torch.save({"format": ckpt.FORMAT, "evil": _Boom(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="evil.pt") as err:
        ckpt.load(tmp_path / "evil.pt")
    assert not marker.exists()
    # one line, and not torch's advice to load it with weights_only=False (which runs its code)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))    # a JPEG given as a checkpoint
    with pytest.raises(ckpt.CheckpointError, match="photo.jpg: not a readable checkpoint") as err:
        ckpt.load(tmp_path / "photo.jpg")
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ckpt.CheckpointError, match="pickle.pt: not a readable checkpoint"):
        ckpt.load(tmp_path / "pickle.pt")


def test_checkpoint_with_the_marker_but_missing_keys_names_them(tmp_path):
    ckpt.save(tmp_path / "part.pt", {"model": {}, "epoch": 1})
    with pytest.raises(ckpt.CheckpointError, match="part.pt: incomplete checkpoint, missing config, step"):
        ckpt.load(tmp_path / "part.pt")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="missing.pt: no such checkpoint file"):
        ckpt.load(tmp_path / "missing.pt")


def test_save_refuses_nonfinite_weights_or_momentum_and_writes_nothing(tmp_path):
    good = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}}}
    ckpt.save(tmp_path / "last.pt", good)
    before = (tmp_path / "last.pt").read_bytes()
    for bad in ({"model": {"w": torch.tensor([1.0, math.nan])}, "optimizer": good["optimizer"]},
                {"model": good["model"], "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([-math.inf])}}}}):
        with pytest.raises(ckpt.NonFiniteState):
            ckpt.save(tmp_path / "last.pt", bad)
    assert (tmp_path / "last.pt").read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    assert ckpt.nonfinite_tensor({"optimizer": {"state": {3: {"momentum_buffer": torch.tensor([math.nan])}}}}) \
        == "optimizer.state.3.momentum_buffer"


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


def _state(step=0, lr=0.1):
    return TrainState(schedule=PlateauSchedule(lr=lr), seed=0, batch_size=4, world=1, step=step)


def _hooks(**kw):
    return StepHooks(precision=Precision("none", torch.device("cpu")), **kw)


def test_train_steps_stops_at_the_epochs_planned_batches():
    net = _tiny()
    state, batches = _state(), iter(list(_batches(25)))
    reason = train_steps(net, make_optimizer(net, TrainConfig()), batches, state, StepPlan(epoch_batches=23),
                         CPU, _hooks())
    assert reason == "epoch_end" and (state.step, state.batch, state.sums.images) == (23, 23, 92)
    assert len(list(batches)) == 2                       # the rest was not consumed


def test_train_steps_sums_are_the_models_own_counts():
    """With lr 0 the weights never move, so the epoch's sums must equal the fixed model's loss
    and top-1/top-5 hits on the same batches, computed here without the loop."""
    net = _tiny()
    data = list(_batches(7))
    state = _state(lr=0.0)
    train_steps(net, make_optimizer(net, TrainConfig()), iter(data), state, StepPlan(epoch_batches=7), CPU, _hooks())
    with torch.no_grad():
        logits = [net(x) for x, _ in data]
    top1 = sum(int((lg.argmax(1) == y).sum()) for lg, (_, y) in zip(logits, data))
    top5 = sum(int((lg.topk(3, 1).indices == y[:, None]).any(1).sum()) for lg, (_, y) in zip(logits, data))
    assert (state.sums.top1, state.sums.top5) == (top1, top5) == (top1, 28)   # 3 classes: all in the top 5
    assert state.sums.loss == pytest.approx(sum(float(loss_fn(lg, y)) for lg, (_, y) in zip(logits, data)), rel=1e-6)


def test_train_steps_ends_when_the_loader_runs_out():
    net = _tiny()
    state = _state()
    reason = train_steps(net, make_optimizer(net, TrainConfig()), iter(list(_batches(5))), state,
                         StepPlan(epoch_batches=9), CPU, _hooks())
    assert reason == "epoch_end" and (state.step, state.batch) == (5, 5)


def test_train_steps_stop_request_ends_after_the_current_step():
    net = _tiny()
    state, batches = _state(), iter(list(_batches(5)))
    reason = train_steps(net, make_optimizer(net, TrainConfig()), batches, state, StepPlan(epoch_batches=5), CPU,
                         _hooks(after_step=lambda st: st.step >= 2))
    assert reason == "stopped" and state.batch == 2 and len(list(batches)) == 3


def test_train_steps_max_steps_counts_the_whole_run():
    net = _tiny()
    state = _state(step=10)                              # a resumed run: 10 steps in earlier epochs
    reason = train_steps(net, make_optimizer(net, TrainConfig()), iter(list(_batches(5))), state,
                         StepPlan(epoch_batches=5, max_steps=12), CPU, _hooks())
    assert reason == "max_steps" and (state.step, state.batch) == (12, 2)


def test_train_steps_sets_the_warmup_lr_from_the_step_counter():
    net = _tiny()
    opt = make_optimizer(net, TrainConfig())
    lrs = []
    state = _state(step=1, lr=0.08)
    train_steps(net, opt, iter(list(_batches(4))), state, StepPlan(epoch_batches=4, warmup_steps=4), CPU,
                _hooks(after_step=lambda st: lrs.append(opt.param_groups[0]["lr"])))
    assert lrs == pytest.approx([0.04, 0.06, 0.08, 0.08])     # steps 2, 3, 4, 5 of a 4-step warm-up


def test_nonfinite_loss_names_the_step():
    net = _tiny()
    with pytest.raises(NonFiniteLoss) as exc:
        # global steps 101..: batch index 13 is step 114; checked every 10 steps, so found late
        train_steps(net, make_optimizer(net, TrainConfig()), iter(list(_batches(30, bad_at=13))), _state(step=100),
                    StepPlan(epoch_batches=30), CPU, _hooks())
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
    p = Phases(True, ["cpu"])                 # no warm-up, no end-to-end window: every step split
    for step in range(2):
        p.start_step(step)
        for name in PHASES:
            with p(name):
                time.sleep(0.002)   # every phase takes real time, so the shares are meaningful
        p.end_step(step + 1, torch.zeros(8, 1), torch.zeros(8))
    s = p.summary(2)
    assert s["steps"] == 2 and s["images"] == 16 and s["warmup_steps"] == 0
    # every phase slept above, so each is billed at least that; the step is their sum
    assert all(v["ms_per_step"] >= 2.0 for v in s["phases"].values())
    assert s["step_ms"] == pytest.approx(sum(v["ms_per_step"] for v in s["phases"].values()))
    assert s["images_per_s"] == pytest.approx(16 / (s["step_ms"] * 2 / 1000))
    assert s["data_stall_percent"] == pytest.approx(100 * s["phases"]["data"]["ms_per_step"] / s["step_ms"])


def test_stop_poll_waits_for_a_shared_step_only_when_distributed():
    """One process reads the signal flag every step; ranks poll the collective every
    check_every steps, so all of them stop after the same step."""
    from types import SimpleNamespace as NS
    flag = type("Flag", (), {"__bool__": lambda self: True})()
    single = NS(info=NS(enabled=False), settings=NS(check_every=3), devices=["cpu"], host_group=None)
    assert stop_poll(single, flag)(1) is True
    ranks = NS(info=NS(enabled=True), settings=NS(check_every=3), devices=["cpu"], host_group=None)
    poll = stop_poll(ranks, flag)          # no process group here: the local flag
    assert [poll(step) for step in range(1, 7)] == [False, False, True, False, False, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only restore of GPU-saved RNG states")
def test_rng_states_saved_on_gpus_restore_the_cpu_generator_and_say_what_was_not():
    torch.manual_seed(5)
    saved = {"cpu": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    expected = torch.rand(3)
    torch.manual_seed(6)
    assert ckpt.set_rng_state(saved) == "2 CUDA RNG states saved, 0 GPU(s) visible: restored 0"
    assert torch.equal(torch.rand(3), expected)


def test_records_without_a_validation_split_are_refused_before_training(sample_records, tmp_path):
    """Every epoch ends with a validation pass: records without val must fail at start, not
    after the first (on ImageNet: hours-long) epoch, and again at every resume."""
    meta = json.loads((sample_records / "meta.json").read_text())
    assert resolve_records(TrainConfig(records=str(sample_records)))[1] == len(meta["classes"])
    meta["counts"]["val"] = 0
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RecordsError, match="no validation records"):
        resolve_records(TrainConfig(records=str(tmp_path)))


def test_fewer_validation_records_than_ranks_are_refused_before_training(sample_records, tmp_path):
    """Each rank validates its own share of the val split (rank r reads positions
    [n*r//world, n*(r+1)//world)): with fewer records than ranks some share is empty, which
    must fail at start on every rank, not on one rank after the first epoch."""
    meta = json.loads((sample_records / "meta.json").read_text())
    meta["counts"]["val"] = 3
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert resolve_records(TrainConfig(records=str(tmp_path)), world=3)[1] == len(meta["classes"])
    with pytest.raises(RecordsError, match="3 validation record.s. for 4 ranks"):
        resolve_records(TrainConfig(records=str(tmp_path)), world=4)
