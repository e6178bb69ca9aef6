"""--profile's numbers mean what they say: the warm-up counts in no rate, the end-to-end rate
comes from steps run as an unprofiled run runs them, and measuring the in-loop model rate
leaves the run exactly as an unprofiled run leaves it (tiny model, plain-tensor batches)."""
from __future__ import annotations

import json
import time

import torch

from engine import run as R
from engine import session as S
from test_train_engine import assert_same_tensors, config, session

KEYS = ("steps", "images_per_s", "data_stall_percent", "step_ms", "warmup_steps", "end_to_end_steps",
        "end_to_end_images_per_s", "model_steps", "model_images_per_s", "stall_percent")


def profiled(out, slow_first: float = 0.0, **kw):
    """A profiled 2-epoch run (10 steps of 4 images); ``slow_first``: seconds the loader takes
    to hand out the run's first batch (a cold start)."""
    def hook(i, x):
        if i == 0 and slow_first:
            time.sleep(slow_first)
        return x
    cfg = config(profile=True, **kw)
    s = session(out, cfg, hooks={0: hook})
    state = S.new_state(cfg, 1)
    assert R.run_session(s, state) == 0
    return s, json.loads((out / "profile.json").read_text())


def test_profile_json_has_the_rates_gpu_check_reads(tmp_path):
    _, prof = profiled(tmp_path / "run", profile_warmup=2, profile_window=3)
    assert set(KEYS) <= set(prof)
    # 10 steps: 2 warm-up, 3 end to end, 5 split by phase; the model rate on its own window
    assert (prof["warmup_steps"], prof["end_to_end_steps"], prof["steps"], prof["images"]) == (2, 3, 5, 20)
    assert prof["model_steps"] == 3
    assert prof["end_to_end_images_per_s"] > 0 and prof["model_images_per_s"] > 0
    want = 100 * (1 - prof["end_to_end_images_per_s"] / prof["model_images_per_s"])
    assert abs(prof["stall_percent"] - want) < 1e-9


def test_a_slow_first_step_moves_no_rate_once_dropped(tmp_path):
    """A first batch that takes 3 s: with the warm-up it is in no rate (the rates stay above the
    20 images / 3 s it would cap a 5-step window at, the split's data wait under its 3 s); without
    one it caps the end-to-end rate. The warm-up also covers the Chrome trace's steps (the
    first 4), whose export is slow."""
    cap = 20 / 3.0
    _, kept = profiled(tmp_path / "dropped", slow_first=3.0, profile_warmup=4, profile_window=4)
    assert kept["end_to_end_images_per_s"] > cap and kept["images_per_s"] > cap
    assert kept["phases"]["data"]["ms_per_step"] < 1000
    _, counted = profiled(tmp_path / "counted", slow_first=3.0, profile_warmup=0, profile_window=5)
    assert counted["end_to_end_images_per_s"] < cap


def test_a_run_too_short_for_a_window_reports_it_not_measured(tmp_path):
    _, prof = profiled(tmp_path / "run", profile_warmup=50, profile_window=200)
    assert prof["warmup_steps"] == 10 and prof["steps"] == 0
    assert prof["end_to_end_images_per_s"] is None and prof["stall_percent"] is None


def test_measuring_the_model_rate_leaves_the_run_bitwise_an_unprofiled_run(tmp_path):
    """The weights, the optimiser's momentum and the random stream after a profiled run (whose
    model rate trained a copy for 3 + 5 steps) are exactly an unprofiled run's."""
    cfg = config()
    plain = session(tmp_path / "plain", cfg)
    assert R.run_session(plain, S.new_state(cfg, 1)) == 0
    plain_rng = torch.get_rng_state()
    prof_session, prof = profiled(tmp_path / "prof", profile_warmup=1, profile_window=5)
    assert prof["model_steps"] == 5
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for (k, a), b in zip(plain.net.state_dict().items(), prof_session.net.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(plain.net.parameters(), prof_session.net.parameters()):
        assert torch.equal(plain.optimizer.state[p]["momentum_buffer"], prof_session.optimizer.state[q]["momentum_buffer"])
    assert_same_tensors(tmp_path / "plain" / "last.pt", tmp_path / "prof" / "last.pt")
