"""Faults that must not kill or hang a run: fp16 steps the gradient scaler skips are counted,
not treated as divergence; a bad record or a NaN loss on ONE rank of a distributed run stops
every rank after the same step (saved together, exit 2; or exit 3 together), never a hang;
a bad validation record on one rank, or a write only rank 0 makes failing, stops every rank
with the same exit status."""
from __future__ import annotations

import errno
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from common.atomic import atomic_open
from common.errors import UserError, error_line
from engine import checkpoint as ckpt
from engine import distributed as D
from engine import logs, runfolder
from engine import resume as resuming
from engine import run as R
from engine import session as S
from engine.config import TrainConfig
from engine.loop import LoopSettings, StepHooks, StepPlan, train_steps
from engine.precision import Precision
from engine.recipe import make_optimizer
from engine.report import Reporter
from tests.test_train_dist import free_port, run_ranks
from engine.schedule import PlateauSchedule
from engine.state import TrainState
from records.format import RecordsError

CPU = torch.device("cpu")


# --- fp16: a skipped step is the scaler's business --------------------------------------------

class _InfGrad(torch.autograd.Function):
    """Identity forward; backward hands back inf gradients while ``armed`` (the loss stays finite)."""
    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf") if _InfGrad.armed else grad


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return _InfGrad.apply(self.fc(x.flatten(1)))


def _fp16_run_with_two_inf_steps(device: str):
    """Six fp16 steps of a linear model on ``device``; steps 2 and 4 get inf gradients."""
    torch.manual_seed(0)
    net = _Net().to(device)
    opt = make_optimizer(net, TrainConfig(lr=0.1))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 2, 2, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(6)]
    precision = Precision("fp16", torch.device(device).type)
    weights = []

    def after_step(state):
        weights.append(net.fc.weight.detach().cpu().clone())
        _InfGrad.armed = state.step in (1, 3)
        return False

    state = TrainState(schedule=PlateauSchedule(lr=0.1), seed=0, batch_size=4, world=1)
    settings = LoopSettings(torch.device(device), check_every=4)
    hooks = StepHooks(precision=precision, after_step=after_step)
    try:
        reason = train_steps(net, opt, iter(batches), state, StepPlan(epoch_batches=6), settings, hooks)
    finally:
        _InfGrad.armed = False
    assert reason == "epoch_end" and state.step == 6 and state.sums.images == 24
    assert state.sums.amp_skipped == 2 and state.sums.metrics(6)["amp_skipped"] == 2
    assert torch.equal(weights[1], weights[0]) and torch.equal(weights[3], weights[2])   # untouched
    assert not torch.equal(weights[2], weights[1])                                      # step 3 updated
    assert precision.scale == 2.0 ** 16 / 4                                             # halved twice


def test_fp16_steps_with_inf_gradients_are_skipped_counted_and_do_not_stop():
    _fp16_run_with_two_inf_steps("cpu")


@pytest.mark.gpu
def test_fp16_steps_with_inf_gradients_on_cuda_are_skipped_counted_and_do_not_stop():
    _fp16_run_with_two_inf_steps("cuda:0")


# --- distributed: every rank stops after the same step ----------------------------------------

BATCHES, BATCH, FAULT_AT = 6, 2, 3      # rank 1's loader fails while fetching batch 3 (0-based)


class _Loader:
    epoch = 0

    def __init__(self, seed: int, rank: int, fault: str | None):
        self.seed, self.rank, self.fault = seed, rank, fault
        self.epoch_size = BATCHES * BATCH

    def __len__(self):
        return BATCHES

    def iter_epoch(self, epoch, start=0):
        g = torch.Generator().manual_seed(self.seed * 10 + self.rank)
        for i in range(BATCHES):
            x, y = torch.randn(BATCH, 3, 2, 2, generator=g), torch.randint(0, 5, (BATCH,), generator=g)
            if i >= start:
                if self.rank == 1 and i == FAULT_AT and self.fault == "record":
                    raise RecordsError("shard-00003.tar: record k17: cannot decode")
                if self.rank == 1 and i == FAULT_AT and self.fault == "die" and self.seed == 1:   # epoch 1
                    os.kill(os.getpid(), signal.SIGKILL)     # the OOM killer, a node lost
                if self.rank == 1 and i == FAULT_AT and self.fault == "nan":
                    x = x * float("inf")
                yield x, y

    __iter__ = lambda self: self.iter_epoch(0)


class _Data:
    def __init__(self, rank, fault):
        self.rank, self.fault = rank, fault

    def train(self, epoch):
        if self.rank == 1 and self.fault == "train_loader":
            raise RecordsError("records/train/shard-000003.idx: unreadable (Input/output error)")
        return _Loader(epoch, self.rank, self.fault)

    def val(self, view):
        return _Loader(99, self.rank, "record" if self.fault == "val_record" else None)


def _inject_write_faults(rank: int, fault: str) -> None:
    """Rank 0 only: the disk fills up while the second checkpoint is written (the first one is
    written), the first metrics.jsonl line cannot be appended, or the run's log (TensorBoard's
    folder) cannot be opened."""
    if rank != 0:
        return
    if fault == "disk_full":
        real, calls = ckpt.write_bytes, []

        def full(path, data):
            calls.append(path)
            if len(calls) == 1:
                return real(path, data)
            with atomic_open(path, "wb") as fh:      # half a checkpoint in the temp file, then ENOSPC
                fh.write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        ckpt.write_bytes = full
    if fault == "metrics":
        def full(path, line):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        runfolder.append_line = full
    if fault == "log":
        def denied(*args, **kwargs):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), "runs/x/tensorboard")
        logs.RunLog.open = denied


def _rank(rank: int, world: int, port: int, out: str, fault: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    info = D.dist_info_from_env()
    D.init_process_group(info, ["cpu"])
    epochs = 2 if fault in ("disk_full", "metrics", "die") else 1
    cfg = TrainConfig(gpus="", batch_size=BATCH, epochs=epochs, lr=0.05, seed=3, final_eval=False, progress=False)
    _inject_write_faults(rank, fault)
    torch.manual_seed(cfg.seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    s = S.Session(cfg=cfg, info=info, devices=["cpu"], out=Path(out), say=Reporter(info.is_main, False),
                  data=_Data(rank, fault), classes=5, net=net, model=D.wrap_ddp(net, info),
                  optimizer=make_optimizer(net, cfg), settings=LoopSettings(CPU, check_every=2),
                  precision=Precision("none", "cpu"), host_group=D.host_group(info))
    state = S.new_state(cfg, world)
    if fault == "resume":                         # the records fixed: continue from last.pt
        path = Path(out, "last.pt")
        resuming.restore(s, state, ckpt.load(path, keys=resuming.RESUME_KEYS), path, lr_given=False)
    if fault == "diverged_start" and rank == 1:    # rank 1 read another last.pt (or none)
        state.epoch, state.step = 1, BATCHES
    with open(Path(out, f"rank{rank}.err"), "w") as err, contextlib.redirect_stderr(err):
        try:
            resuming.check_same_start(s, state)               # what engine.run.train does before the epochs
            code = R.run_session(s, state)
        except (UserError, OSError) as exc:       # what engine.run.main does with them
            print(f"error: {error_line(exc)}", file=sys.stderr)
            code = 2
    Path(out, f"rank{rank}.code").write_text(str(code))
    D.shutdown(info)


def _spawn(out: Path, fault: str) -> list[int]:
    run_ranks(_rank, (2, free_port(), str(out), fault), timeout=180.0)
    return [int((out / f"rank{r}.code").read_text()) for r in (0, 1)]


def _error_lines(out: Path) -> list[str]:
    """Each rank's first stderr line."""
    return [(out / f"rank{r}.err").read_text().splitlines()[0] for r in (0, 1)]


def test_a_bad_record_on_one_rank_stops_both_after_the_same_step_and_saves(tmp_path):
    assert _spawn(tmp_path, "record") == [2, 2]
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (0, FAULT_AT, FAULT_AT)
    assert len(saved["rng"]) == 2                    # both ranks joined the save


def test_a_rank_that_dies_stops_the_survivor_with_one_line_and_exit_4(tmp_path):
    """Rank 1 is killed (SIGKILL) mid-epoch, after the epoch-0 checkpoint: rank 0 stops with one
    line naming rank 1 and saying how the run continues, exit 4, never a hang or a traceback;
    the last checkpoint is the one a resume continues from."""
    ctx = mp.start_processes(_rank, args=(2, free_port(), str(tmp_path), "die"), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        for p in ctx.processes:         # not ctx.join: it kills the survivor once a rank dies
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        assert not any(p.is_alive() for p in ctx.processes), "a rank still running after 180 s: a hang"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert ctx.processes[1].exitcode == -signal.SIGKILL
    assert (tmp_path / "rank0.code").read_text() == "4"
    err = (tmp_path / "rank0.err").read_text().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: rank 1 vanished") and f"--resume {tmp_path}" in err[0]
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, BATCHES, 0)


def test_a_nan_loss_on_one_rank_stops_both_with_exit_3(tmp_path):
    assert _spawn(tmp_path, "nan") == [3, 3]
    assert not (tmp_path / "last.pt").exists()


def test_a_bad_validation_record_on_one_rank_stops_both_and_saves_the_trained_epoch(tmp_path):
    assert _spawn(tmp_path, "val_record") == [2, 2]
    saved = ckpt.load(tmp_path / "last.pt")
    # the epoch's steps are kept, not validated: a resume after the fix only validates
    assert (saved["epoch"], saved["step"], saved["batch"]) == (0, BATCHES, BATCHES)
    assert saved["history"] == [] and len(saved["rng"]) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    lines = _error_lines(tmp_path)
    assert lines[0] == lines[1] and "record k17" in lines[0]      # every rank names the record
    assert _spawn(tmp_path, "resume") == [0, 0]
    resumed = ckpt.load(tmp_path / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (1, BATCHES)      # no step trained twice
    assert all(torch.equal(resumed["model"][k], saved["model"][k]) for k in saved["model"])
    assert len(resumed["history"]) == 1 and resumed["history"][0]["train_images"] == 2 * BATCHES * BATCH


def test_a_full_disk_on_rank_0_stops_both_with_exit_2_and_keeps_the_previous_checkpoint(tmp_path):
    assert _spawn(tmp_path, "disk_full") == [2, 2]
    saved = ckpt.load(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, BATCHES, 0)
    assert not list(tmp_path.glob(".*.tmp"))          # the half-written temp file is gone
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    lines = _error_lines(tmp_path)
    assert lines[0] == lines[1] and "last.pt: cannot write the checkpoint (No space left" in lines[0]


def test_a_failed_metrics_line_on_rank_0_stops_both_with_exit_2(tmp_path):
    assert _spawn(tmp_path, "metrics") == [2, 2]
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 1      # written before the line it describes
    lines = _error_lines(tmp_path)
    assert lines[0] == lines[1] and "metrics.jsonl: cannot write" in lines[0]


@pytest.mark.parametrize("fault,names", [("train_loader", "shard-000003.idx: unreadable"),
                                         ("log", "runs/x/tensorboard")])
def test_a_failure_to_start_on_one_rank_stops_both_with_exit_2(tmp_path, fault, names):
    """Rank 1 cannot build its train loader, or rank 0 cannot open the run's log: both ranks
    exit 2 with the same line, none waits in a collective for the other."""
    assert _spawn(tmp_path, fault) == [2, 2]
    lines = _error_lines(tmp_path)
    assert lines[0] == lines[1] and names in lines[0]


def test_ranks_that_start_from_different_checkpoints_stop_at_once(tmp_path):
    """One rank resumed from a last.pt the other did not see (no shared file system): both
    exit 2 with the same line naming the positions, before any step."""
    assert _spawn(tmp_path, "diverged_start") == [2, 2]
    lines = _error_lines(tmp_path)
    assert lines[0] == lines[1] and "rank 0: epoch 1 step 0, rank 1: epoch 2 step 6" in lines[0]
    assert not (tmp_path / "last.pt").exists()
