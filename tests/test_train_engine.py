"""The engine's promises on a tiny model and plain-tensor batches (no DALI, no AlexNet), so each
run takes well under a second: stops at any step continue bitwise, nothing non-finite is ever
saved, a failed write keeps the previous checkpoint and metrics.jsonl consistent with it."""
from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from common.atomic import atomic_open, lock_folder
from engine import checkpoint as ckpt
from engine import resume as resuming
from engine import runfolder
from engine import run as R
from engine import session as S
from engine.config import TrainConfig
from engine.distributed import DistInfo
from engine.loop import LoopSettings
from engine.precision import Precision
from engine.recipe import make_optimizer
from engine.report import Reporter
from records.format import RecordsError

CPU = torch.device("cpu")
BATCHES, BATCH = 5, 4            # per epoch; images per batch


class FakeLoader:
    """Epoch e's batches: a fixed function of (seed, e), like the real loader. ``hook(i)`` runs
    before batch i is handed out (to send a signal, raise a bad record, or poison a batch)."""

    def __init__(self, seed: int, n: int, batch: int, hook=None, views: int = 1):
        self.seed, self.n, self.batch, self.hook, self.views = seed, n, batch, hook, views
        self.epoch_size = n * batch

    epoch = 0   # the real Loader's: this object reads one epoch, fixed at construction

    def __len__(self) -> int:
        return self.n

    def iter_epoch(self, epoch: int, start: int = 0):
        """Batches start, start+1, ... of the epoch (the real Loader does not decode the skipped)."""
        batches = iter(self)
        for _ in range(start):
            next(batches)
        return batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for i in range(self.n):
            shape = (self.batch, 3, 2, 2) if self.views == 1 else (self.batch, self.views, 3, 2, 2)
            x, y = torch.randn(*shape, generator=g), torch.randint(0, 5, (self.batch,), generator=g)
            if self.hook is not None:
                x = self.hook(i, x)
            yield x, y


class FakeData:
    def __init__(self, cfg: TrainConfig, hooks: dict | None = None):
        self.cfg, self.hooks = cfg, hooks or {}     # {epoch: hook}

    def train(self, epoch: int) -> FakeLoader:
        return FakeLoader(1000 * self.cfg.seed + epoch, BATCHES, self.cfg.batch_size, self.hooks.get(epoch))

    def val(self, view: str) -> FakeLoader:
        return FakeLoader(99, 2, 3, self.hooks.get(view), views=10 if view == "tencrop" else 1)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"gpus": "", "batch_size": BATCH, "epochs": 2, "lr": 0.05, "seed": 3,
                          "warmup_steps": 3, "final_eval": False, "progress": False, **kw})


def session(out: Path, cfg: TrainConfig, hooks: dict | None = None) -> S.Session:
    torch.manual_seed(cfg.seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5))
    torch.manual_seed(cfg.seed + 1)              # dropout: consumed every step, so RNG restore matters
    out.mkdir(parents=True, exist_ok=True)
    return S.Session(cfg=cfg, info=DistInfo(), devices=["cpu"], out=out, say=Reporter(True, False),
                     data=FakeData(cfg, hooks), classes=5, net=net, model=net,
                     optimizer=make_optimizer(net, cfg), settings=LoopSettings(CPU), precision=Precision(cfg.amp, "cpu"))


def start(out: Path, cfg: TrainConfig, hooks: dict | None = None) -> int:
    s = session(out, cfg, hooks)
    return R.run_session(s, S.new_state(cfg, 1))


def resume(out: Path, cfg: TrainConfig, hooks: dict | None = None, lr_given: bool = False) -> int:
    s = session(out, cfg, hooks)
    state = S.new_state(cfg, 1)
    resuming.restore(s, state, ckpt.load(out / "last.pt", keys=resuming.RESUME_KEYS), out / "last.pt", lr_given)
    return R.run_session(s, state)


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = ckpt.load(a), ckpt.load(b)
    assert (x["epoch"], x["step"], x["batch"]) == (y["epoch"], y["step"], y["batch"])
    for key in x["model"]:
        assert torch.equal(x["model"][key], y["model"][key]), key
    assert x["optimizer"]["state"].keys() == y["optimizer"]["state"].keys()
    for k, buf in x["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], y["optimizer"]["state"][k]["momentum_buffer"]), k


def metrics(out: Path) -> list[dict]:
    drop = ("images_per_s", "epoch_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted 2-epoch run every interrupted one must reproduce bitwise."""
    out = tmp_path_factory.mktemp("full")
    assert start(out, config()) == 0
    return out


def test_sigterm_mid_epoch_then_resume_is_bitwise_the_uninterrupted_run(full, tmp_path):
    def sigterm(i, x):
        if i == 2:                                  # while fetching epoch 2's third batch
            os.kill(os.getpid(), signal.SIGTERM)
        return x
    assert start(tmp_path, config(), {1: sigterm}) == 128 + signal.SIGTERM
    saved = ckpt.load(tmp_path / "last.pt")
    assert saved["epoch"] == 1 and 1 <= saved["batch"] < BATCHES     # stopped mid-epoch 2
    assert saved["step"] == BATCHES + saved["batch"]
    assert len(metrics(tmp_path)) == 1
    assert resume(tmp_path, config()) == 0
    assert_same_tensors(full / "last.pt", tmp_path / "last.pt")
    assert metrics(tmp_path) == metrics(full)


def test_fp16_stop_mid_epoch_then_resume_is_bitwise_and_carries_the_loss_scale(tmp_path):
    """fp16 with its gradient scaler (which runs on the CPU too): the scale and its growth
    counter are saved and restored, so the resumed run scales (and would skip) exactly like
    the uninterrupted one."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert start(full, config(amp="fp16")) == 0
    assert start(part, config(amp="fp16", max_steps=BATCHES + 2)) == 0
    assert resume(part, config(amp="fp16", max_steps=None)) == 0
    assert_same_tensors(full / "last.pt", part / "last.pt")
    assert metrics(part) == metrics(full)
    a, b = ckpt.load(full / "last.pt")["precision"], ckpt.load(part / "last.pt")["precision"]
    assert a == b and a["amp"] == "fp16"
    assert a["scaler"]["_growth_tracker"] == 2 * BATCHES      # every step counted, none lost at the resume
    assert [m["amp_skipped"] for m in metrics(full)] == [0, 0]


def test_max_steps_mid_epoch_neither_validates_nor_counts_the_epoch(full, tmp_path):
    assert start(tmp_path, config(max_steps=BATCHES + 2)) == 0
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, BATCHES + 2, 2)
    assert len(saved["history"]) == 1 and saved["schedule"]["bad_epochs"] + saved["schedule"]["drops"] == 0
    assert len(metrics(tmp_path)) == 1               # epoch 2 not logged as if it were complete
    assert resume(tmp_path, config(max_steps=None)) == 0
    assert_same_tensors(full / "last.pt", tmp_path / "last.pt")
    assert metrics(tmp_path) == metrics(full)


def test_max_steps_stop_skips_the_final_evaluation(tmp_path):
    """A run cut into scheduler-sized chunks with --max-steps must not pay the whole 10-crop
    evaluation (nor write eval.json with mid-epoch numbers) at every chunk."""
    assert start(tmp_path, config(max_steps=BATCHES + 2, final_eval=True)) == 0
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "eval.json").exists()
    assert resume(tmp_path, config(max_steps=None, final_eval=True)) == 0
    assert (tmp_path / "eval.json").exists()
    # a chunk that ends exactly at an epoch's end (whole-epoch chunks) is no different
    edge = tmp_path / "edge"
    assert start(edge, config(max_steps=BATCHES, final_eval=True, epochs=2)) == 0
    assert ckpt.load(edge / "last.pt")["epoch"] == 1 and not (edge / "eval.json").exists()


def test_resume_applies_explicit_momentum_and_weight_decay(tmp_path):
    """optimizer.load_state_dict brings back the saved run's momentum and weight decay; the
    resumed run's flags (reported as overrides) must be the ones it trains with."""
    assert start(tmp_path, config(max_steps=3)) == 0
    cfg = config(momentum=0.5, weight_decay=0.002)
    s = session(tmp_path, cfg)
    resuming.restore(s, S.new_state(cfg, 1), ckpt.load(tmp_path / "last.pt", keys=resuming.RESUME_KEYS), tmp_path / "last.pt", False)
    assert [(g["momentum"], g["weight_decay"]) for g in s.optimizer.param_groups] == [(0.5, 0.002)]


def sigterm_once(at: int = 0):
    """A hook that sends SIGTERM while batch ``at`` of the first loader it serves is fetched."""
    sent = []

    def hook(i, x):
        if i == at and not sent:
            sent.append(i)
            os.kill(os.getpid(), signal.SIGTERM)
        return x
    return hook


def test_sigterm_during_validation_stops_at_once_and_the_resume_validates(full, tmp_path, capsys):
    """A validation takes minutes on ImageNet, longer than a scheduler's grace period: a signal
    there stops after the current batch, keeps the epoch's steps, and a resume validates them
    without a step twice."""
    assert start(tmp_path, config(), {"center": sigterm_once()}) == 128 + signal.SIGTERM
    out = capsys.readouterr()
    assert "SIGTERM received: saving after this step or batch" in out.err
    assert "SIGTERM received during validation" in out.out and f"--resume {tmp_path}" in out.out
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (0, BATCHES, BATCHES)   # the epoch's steps
    assert metrics(tmp_path) == []                                                      # not validated
    assert resume(tmp_path, config()) == 0
    assert_same_tensors(full / "last.pt", tmp_path / "last.pt")
    assert metrics(tmp_path) == metrics(full)


def test_sigterm_during_the_final_evaluation_stops_and_the_resume_evaluates(tmp_path, capsys):
    cfg = config(final_eval=True)
    assert start(tmp_path, cfg, {"tencrop": sigterm_once()}) == 128 + signal.SIGTERM
    assert "during the final evaluation" in capsys.readouterr().out
    assert not (tmp_path / "eval.json").exists()
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"]) == (2, 2 * BATCHES)
    assert resume(tmp_path, cfg) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 2 * BATCHES
    assert ckpt.load(tmp_path / "last.pt")["step"] == 2 * BATCHES       # nothing trained again


def test_the_final_evaluation_is_of_best_pt_and_says_so(tmp_path, capsys):
    """The final single- vs 10-crop table evaluates the weights figures, export and predict use
    (best.pt), not the last ones, when an earlier epoch was the best."""
    import shutil
    from engine.loop import evaluate
    assert start(tmp_path, config(epochs=1)) == 0
    shutil.copy(tmp_path / "best.pt", tmp_path / "epoch1.pt")
    assert resume(tmp_path, config(epochs=2)) == 0
    last = ckpt.load(tmp_path / "last.pt", keys=resuming.RESUME_KEYS)  # epoch 2 made the worse one
    last["history"][1]["val_top1_err"] = 2.0
    ckpt.save(tmp_path / "last.pt", last)
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / "best.pt")
    capsys.readouterr()
    assert resume(tmp_path, config(epochs=2, final_eval=True)) == 0     # runs the missing final evaluation
    assert "Validation error of best.pt (epoch 1, the lowest validation top-1 error)" in capsys.readouterr().out
    written = json.loads((tmp_path / "eval.json").read_text())
    assert (written["checkpoint"], written["best_epoch"], written["step"]) == ("best.pt", 1, 2 * BATCHES)

    def loss_of(weights: Path) -> float:
        net = session(tmp_path / "x", config()).net
        net.load_state_dict(ckpt.load(weights)["model"])
        return evaluate(net, FakeLoader(99, 2, 3), LoopSettings(CPU))["loss_sum"] / 6
    assert written["center"]["loss"] == pytest.approx(loss_of(tmp_path / "epoch1.pt"), rel=1e-6)
    assert written["center"]["loss"] != pytest.approx(loss_of(tmp_path / "last.pt"), rel=1e-6)


def test_a_second_process_on_the_same_run_is_refused(tmp_path, capsys):
    """Two train.py on one run folder (a job submitted twice, a requeue while the old job
    drains) would write the same last.pt and metrics.jsonl: the second refuses, touching nothing."""
    assert start(tmp_path, config(epochs=1)) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    held = lock_folder(tmp_path / runfolder.RUN_LOCK)       # another open file: flock refuses it too
    try:
        with pytest.raises(S.RunError, match="another train.py is running this run"):
            resume(tmp_path, config(epochs=2))
    finally:
        os.close(held)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert resume(tmp_path, config(epochs=2)) == 0      # the lock released, the run goes on


def test_a_checkpoint_replaced_after_it_was_read_is_not_resumed(tmp_path):
    """A requeued job reads last.pt while the old job still drains and saves a newer one: the
    newer steps would be lost, so the resume is refused once the lock is ours."""
    assert start(tmp_path, config(epochs=1)) == 0
    read = (tmp_path / "last.pt", os.stat(tmp_path / "last.pt"))
    assert resume(tmp_path, config(epochs=2)) == 0          # "the old job" saves a newer last.pt
    s = session(tmp_path, config(epochs=3))
    state = S.new_state(s.cfg, 1)
    resuming.restore(s, state, ckpt.load(tmp_path / "last.pt", keys=resuming.RESUME_KEYS), tmp_path / "last.pt", False)
    with pytest.raises(S.RunError, match="last.pt: replaced since this process read it"):
        R.run_session(s, state, read)


def test_a_fresh_run_rewrites_a_failed_runs_config(tmp_path, capsys):
    """A fresh run that stopped before its first checkpoint (NaN at step 1) leaves config.json;
    the next fresh run in that folder writes its own flags at start."""
    def nan(i, x):
        return x * float("nan")
    assert start(tmp_path, config(lr=0.5), {0: nan}) == 3
    assert not (tmp_path / "last.pt").exists()
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.5
    assert start(tmp_path, config(lr=0.05, epochs=1), {0: nan}) == 3
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.05


def test_bad_record_saves_the_last_step_and_resumes_exactly(full, tmp_path, capsys):
    def bad(i, x):
        if i == 3:
            raise RecordsError("shard-00001.rec: record 17: truncated JPEG")
        return x
    assert start(tmp_path, config(), {1: bad}) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard-00001.rec: record 17") and f"--resume {tmp_path}" in err
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, BATCHES + 3, 3)
    assert resume(tmp_path, config()) == 0                # the shard was fixed: same batches again
    assert_same_tensors(full / "last.pt", tmp_path / "last.pt")


def test_records_refused_before_the_first_step_write_no_checkpoint(tmp_path, capsys):
    """A bad record (or shard) met before any step of this process: nothing was trained, so a
    new run writes no last.pt (untrained weights are no checkpoint) and a resumed one leaves
    its last.pt as it was."""
    def bad(i, x):
        raise RecordsError("shard-00000.rec: record 0: truncated JPEG")
    assert start(tmp_path, config(), {0: bad}) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard-00000.rec: record 0") and "no checkpoint written" in err
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()
    assert start(tmp_path, config(epochs=1)) == 0        # the records fixed: the same command again
    before = os.stat(tmp_path / "last.pt")
    assert resume(tmp_path, config(epochs=2), {1: bad}) == 2
    assert "(step 5) is as it was" in capsys.readouterr().err
    after = os.stat(tmp_path / "last.pt")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_resume_on_records_with_another_number_of_classes_names_both_counts(tmp_path):
    class Net(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.fc8 = nn.Linear(12, classes)

        def forward(self, x):
            return self.fc8(x.flatten(1))
    cfg = config(records=str(tmp_path / "records"))
    s = session(tmp_path, cfg)
    saved = {"model": Net(5).state_dict(), "optimizer": s.optimizer.state_dict()}
    s = S.Session(**{**vars(s), "net": Net(7), "classes": 7})
    with pytest.raises(S.RunError) as err:
        resuming.restore(s, S.new_state(cfg, 1), saved, tmp_path / "last.pt", lr_given=False)
    assert str(err.value) == (f"{tmp_path / 'last.pt'}: trained on 5 classes, but {tmp_path / 'records'} holds 7; "
                              "resume with the records it was trained on (--records DIR), or start a new run on these")


def test_nonfinite_weights_after_a_finite_loss_are_never_saved(tmp_path, capsys):
    """A NaN report from a real run: a resume with an absurd explicit --lr whose one step has a finite loss
    but leaves inf weights (inputs of 1e30: the logits stay finite, lr x gradient does not)."""
    def poison(i, x):
        x = torch.zeros_like(x)
        x[:, 0, 0, 0] = 1e30
        return x
    assert start(tmp_path, config(epochs=1)) == 0
    before = (tmp_path / "last.pt").read_bytes()
    assert resume(tmp_path, config(epochs=2, epoch_steps=1, lr=1e10), {1: poison}, lr_given=True) == 3
    err = capsys.readouterr().err
    assert "non-finite weights or momentum" in err
    assert f"the last finite checkpoint is {tmp_path / 'last.pt'} (step {BATCHES})" in err
    assert (tmp_path / "last.pt").read_bytes() == before
    for path in tmp_path.glob("*.pt"):
        state = ckpt.load(path)
        assert ckpt.nonfinite_tensor({"m": state["model"], "o": state["optimizer"]}) is None, path
    assert len(metrics(tmp_path)) == 1


def test_nonfinite_loss_with_no_checkpoint_says_so(tmp_path, capsys):
    def inf(i, x):
        return x * float("inf") if i == 1 else x
    assert start(tmp_path, config(), {0: inf}) == 3
    err = capsys.readouterr().err
    assert "loss became nan at step 2" in err and f"no finite checkpoint in {tmp_path}" in err
    assert not (tmp_path / "last.pt").exists()


def test_disk_full_at_the_checkpoint_write_keeps_last_pt_and_metrics_consistent(tmp_path, monkeypatch):
    assert start(tmp_path, config(epochs=1)) == 0
    before = (tmp_path / "last.pt").read_bytes()

    def full_disk(path, data):                       # the real atomic write, failing half-way
        with atomic_open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ckpt, "write_bytes", full_disk)
    with pytest.raises(S.RunError, match=r"last.pt: cannot write the checkpoint \(No space left on device\)"):
        resume(tmp_path, config(epochs=2))
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    saved = ckpt.load(tmp_path / "last.pt")
    assert [m["epoch"] for m in metrics(tmp_path)] == [h["epoch"] for h in saved["history"]] == [1]


def test_resume_rewrites_metrics_from_the_checkpoint_and_removes_stale_temps(tmp_path):
    assert start(tmp_path, config(epochs=1)) == 0
    lines = (tmp_path / "metrics.jsonl").read_text()
    # a crash after a later checkpoint write began: a leftover temp file, a line of an unsaved epoch
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "metrics.jsonl").write_text(lines + lines.replace('"epoch": 1', '"epoch": 2'))
    assert resume(tmp_path, config(epochs=1)) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == lines
    assert not (tmp_path / ".last.pt.abc123.tmp").exists()


def test_mid_epoch_resume_refuses_another_batch_size(tmp_path):
    assert start(tmp_path, config(max_steps=2)) == 0
    with pytest.raises(S.RunError, match=r"saved mid-epoch \(epoch 1, batch 2\) with --batch-size 4 x 1"):
        resume(tmp_path, config(max_steps=None, batch_size=2))


def test_explicit_lr_on_resume_wins_even_when_it_equals_the_original(tmp_path):
    # patience 1 and an impossible threshold: the lr is divided after epoch 2
    cfg = config(plateau_patience=1, plateau_threshold=1.0)
    assert start(tmp_path, cfg) == 0
    assert ckpt.load(tmp_path / "last.pt")["schedule"]["lr"] == pytest.approx(0.005)
    s = session(tmp_path, replace_cfg := config(plateau_patience=1, plateau_threshold=1.0, epochs=3))
    state = S.new_state(replace_cfg, 1)
    resuming.restore(s, state, ckpt.load(tmp_path / "last.pt", keys=resuming.RESUME_KEYS), tmp_path / "last.pt", lr_given=True)
    assert state.schedule.lr == 0.05                  # the config's lr (0.05, as saved) restored
    state = S.new_state(replace_cfg, 1)
    resuming.restore(s, state, ckpt.load(tmp_path / "last.pt", keys=resuming.RESUME_KEYS), tmp_path / "last.pt", lr_given=False)
    assert state.schedule.lr == pytest.approx(0.005)  # not given: the schedule's


def test_resume_path_is_a_folder_or_a_checkpoint_file(tmp_path):
    (tmp_path / "run").mkdir()
    assert resuming.resume_paths(str(tmp_path / "run")) == (tmp_path / "run" / "last.pt", tmp_path / "run")
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    assert resuming.resume_paths(str(tmp_path / "run" / "best.pt")) == (tmp_path / "run" / "best.pt", tmp_path / "run")


def test_the_demo_ends_with_the_imagenet_lines_only_on_the_sample_set(sample_records, sample_source, tmp_path,
                                                                       capsys, monkeypatch):
    from engine import evaluation
    cfg = config(demo=True, final_eval=True, epochs=1, records=str(sample_records))
    assert start(tmp_path / "mine", cfg) == 0
    assert "The real thing" not in capsys.readouterr().out               # --demo --records MINE
    monkeypatch.setattr(evaluation, "DEFAULT_SAMPLE", sample_source)      # these records: the sample set's
    assert start(tmp_path / "sample", cfg) == 0
    assert "The real thing, on ImageNet with two GPUs" in capsys.readouterr().out


def test_keep_last_only_writes_no_best_pt_and_the_final_table_says_last_pt(tmp_path, capsys):
    assert start(tmp_path, config(final_eval=True, keep_last_only=True)) == 0
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()
    assert "Validation error of last.pt (epoch 2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint"] == "last.pt"
