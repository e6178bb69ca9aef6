"""tools.ablate: the variants differ from the paper's net in exactly the documented way, the
interval arithmetic against a printed t table, the report from hand-made runs, and (slow) an
experiment killed and rerun ends with the same table and weights as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import TrainConfig
from model import AlexNet
from model.alexnet import LRN
from model.lrn import local_response_norm
from tools import ablate, ablate_report as rep

REPO = Path(__file__).resolve().parent.parent


def cfg_of(variant: str, records="R", **extra) -> TrainConfig:
    cfg = ablate.AblateConfig(records=str(records), out="O", **extra)
    return ablate.train_config(cfg, variant, 0)


# --- each variant changes one switch, and the net exactly as documented --------------------------

DOCUMENTED = {"paper": {}, "no-lrn": {"lrn": False}, "no-overlap": {"overlap_pool": False},
              "no-dropout": {"dropout": 0.0}, "no-lighting": {"lighting": 0.0}, "one-tower-half": {"towers": 1}}


@pytest.mark.parametrize("variant", list(DOCUMENTED))
def test_each_variant_changes_exactly_its_one_setting(variant):
    paper, cfg = cfg_of("paper"), cfg_of(variant)
    differ = {k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__ if getattr(cfg, k) != getattr(paper, k)}
    assert differ == DOCUMENTED[variant]
    assert paper.lrn and paper.overlap_pool and paper.dropout == 0.5 and paper.lighting == 0.1 and paper.towers == 2


def shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def params(net):
    return sum(p.numel() for p in net.parameters())


# Hand-computed (weights + biases per layer, per image MACs = outputs x fan-in) for 1000 classes:
# paper: conv 34,944 + 307,456 + 885,120 + 663,936 + 442,624, fc 37,752,832 + 16,781,312 + 4,097,000;
# MACs 105,415,200 + 223,948,800 + 149,520,384 + 112,140,288 + 74,760,192 + 37,748,736 + 16,777,216 + 4,096,000.
# one tower, half the conv1-4 kernels: conv 17,472 + 153,728 + 221,376 + 331,968 + 442,624, the fc the same;
# MACs 52,707,600 + 111,974,400 + 37,380,096 + 56,070,144 + 74,760,192 + the same fc.
PAPER_PARAMS, PAPER_MACS = 60_965_224, 724_406_816
HALF_PARAMS, HALF_MACS = 59_798_312, 391_514_384


def test_costs_match_hand_counts_and_the_built_nets():
    assert rep.net_cost(2, True, 1000) == {"params": PAPER_PARAMS, "macs": PAPER_MACS}
    assert rep.net_cost(2, False, 1000) == {"params": PAPER_PARAMS, "macs": PAPER_MACS}
    assert rep.net_cost(1, True, 1000) == {"params": HALF_PARAMS, "macs": HALF_MACS}
    for variant in DOCUMENTED:
        cfg = cfg_of(variant)
        assert params(AlexNet(cfg.model_config(10))) == rep.net_cost(cfg.towers, cfg.overlap_pool, 10)["params"]


def test_feature_sizes_are_the_papers_both_ways():
    # overlapping 3/2: 55 -> 27 -> 13 -> 6; the paper's s = z = 2 gives "equivalent dimensions"
    for overlap in (True, False):
        sizes = rep.feature_sizes(overlap)
        assert (sizes["conv1"], sizes["pool1"], sizes["pool2"], sizes["pool5"]) == (55, 27, 13, 6)


@pytest.fixture(scope="module")
def nets():
    built = {}
    for variant in DOCUMENTED:
        torch.manual_seed(0)
        built[variant] = AlexNet(cfg_of(variant).model_config(10))
    return built


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(1, 3, 224, 224) * 50


def test_variant_nets_differ_from_the_paper_only_as_documented(nets, image):
    paper = nets["paper"]
    for variant in ("no-lrn", "no-overlap", "no-dropout", "no-lighting"):
        assert shapes(nets[variant]) == shapes(paper), variant   # same layers, same sizes
        # the same seed gives the same initial weights: only the switch differs
        assert all(torch.equal(a, b) for a, b in zip(nets[variant].state_dict().values(), paper.state_dict().values()))
    half = shapes(nets["one-tower-half"])
    assert len(nets["one-tower-half"].towers) == 1 and len(paper.towers) == 2
    # one tower: conv1..conv4 half the paper's 96/256/384/384 kernels, each reading all channels;
    # conv5 256 and fc6/fc7 4096 kept (the paper's footnote)
    assert half["towers.0.conv1.weight"] == (48, 3, 11, 11)
    assert half["towers.0.conv2.weight"] == (128, 48, 5, 5)
    assert half["towers.0.conv3.weight"] == (192, 128, 3, 3)
    assert half["towers.0.conv4.weight"] == (192, 192, 3, 3)
    assert half["towers.0.conv5.weight"] == (256, 192, 3, 3)
    assert half["towers.0.fc6.weight"] == (4096, 9216) and half["towers.0.fc7.weight"] == (4096, 4096)
    assert half["fc8.weight"] == (10, 4096)
    assert shapes(paper)["towers.1.conv3.weight"] == (192, 256, 3, 3)    # paper: both towers' 2 x 128
    for variant, net in nets.items():
        trace = net.eval().trace(image)
        assert [tuple(trace[s][0].shape[-2:]) for s in ("conv1", "pool1", "pool2", "pool5")] == \
            [(55, 55), (27, 27), (13, 13), (6, 6)], variant


def test_lrn_and_pooling_switches_act_where_documented(nets, image):
    def pool1_from_conv1(net, norm: bool, kernel: int):
        trace = net.eval().trace(image)
        conv1 = torch.cat(trace["conv1"], dim=1)
        towers = len(net.towers)
        a = local_response_norm(conv1, **LRN, groups=towers) if norm else conv1
        return torch.cat(trace["pool1"], dim=1), F.max_pool2d(a, kernel, 2)
    got, want = pool1_from_conv1(nets["paper"], True, 3)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    got, want = pool1_from_conv1(nets["no-lrn"], False, 3)
    assert torch.equal(got, want)
    got, want = pool1_from_conv1(nets["no-overlap"], True, 2)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    got, want = pool1_from_conv1(nets["paper"], False, 3)      # the paper's LRN does change pool1
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)


def test_dropout_switch(nets, image):
    def train_vs_eval(net):
        with torch.no_grad():
            torch.manual_seed(2)
            trained = net.train()(image)
            return torch.equal(trained, net.eval()(image))
    assert train_vs_eval(nets["no-dropout"])          # nothing dropped: training forward = eval forward
    assert not train_vs_eval(nets["paper"])


def test_no_lighting_keeps_the_crops_and_mirrors(sample_records):
    """The lighting switch reaches the train loader; with it off the windows and mirrors drawn
    for (seed, epoch) are the same, only the lighting coefficients are zero."""
    from engine.session import RecordsData
    from engine.distributed import dist_info_from_env
    draws = {}
    for variant in ("paper", "no-lighting"):
        cfg = cfg_of(variant, records=sample_records, gpus="", batch_size=4)
        loader = RecordsData(Path(sample_records), cfg, dist_info_from_env(), "cpu").train(0)
        assert loader.spec.lighting_std == cfg.lighting
        draws[variant] = loader._feed
    from pipeline import reader
    a = reader.draws(draws["paper"].plan, 0, 0, 4, draws["paper"].lighting_std)
    b = reader.draws(draws["no-lighting"].plan, 0, 0, 4, draws["no-lighting"].lighting_std)
    assert (a[0] == b[0]).all() and (b[1] == 0).all() and (a[1] != 0).any()


# --- the interval arithmetic, against a printed t table ------------------------------------------

# Student's t, two-sided 95% (the 0.975 quantile), from a printed table (e.g. any statistics
# textbook's appendix): df 1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045.
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df,value", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, value):
    assert abs(rep.t_quantile(0.975, df) - value) < 5e-4


def test_paired_interval_by_hand():
    # differences 1, 2, 3 (points): mean 2, sd 1, half-width 4.303 / sqrt(3) = 2.4843
    p = rep.paired_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert p.n == 3 and p.mean == pytest.approx(2.0) and p.sd == pytest.approx(1.0)
    assert p.low == pytest.approx(2 - 2.4843, abs=1e-3) and p.high == pytest.approx(2 + 2.4843, abs=1e-3)
    # paired, not pooled: a shared seed effect cancels (differences 0.1, 0.1 +- tiny)
    q = rep.paired_interval([0.31, 0.52, 0.70], [0.20, 0.40, 0.60])
    assert q.mean == pytest.approx(0.11) and q.low > 0
    one = rep.paired_interval([0.3], [0.2])
    assert one.low is None and one.high is None and rep.judge(one) == rep.UNDECIDED


def test_verdicts():
    assert rep.judge(rep.Paired(3, 0.02, 0.01, 0.005, 0.035)) == rep.CONSISTENT     # variant worse: as claimed
    assert rep.judge(rep.Paired(3, -0.02, 0.01, -0.035, -0.005)) == rep.CONTRADICTS
    assert rep.judge(rep.Paired(3, 0.01, 0.02, -0.04, 0.06)) == rep.UNDECIDED
    assert rep.overall([rep.CONSISTENT, rep.UNDECIDED]) == rep.UNDECIDED
    assert rep.overall([rep.CONSISTENT, rep.CONSISTENT]) == rep.CONSISTENT
    assert rep.overall([rep.CONSISTENT, rep.CONTRADICTS]) == rep.CONTRADICTS


# --- the report from hand-made run folders ----------------------------------------------------

def fake_run(run: Path, top1: float, top5: float, train_top1: float, losses=(2.0, 1.5)):
    run.mkdir(parents=True)
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "step": 10 * (i + 1), "train_loss": loss, "train_top1_err": train_top1,
                    "val_top1_err": top1}) + "\n" for i, loss in enumerate(losses)))
    view = {"top1_err": top1, "top5_err": top5, "loss": 1.0, "images": 20}
    run.joinpath("eval.json").write_text(json.dumps({"epoch": 2, "step": 20, "center": view, "tencrop": view}))


def test_report_from_hand_made_runs(tmp_path):
    top1 = {"paper": [0.40, 0.50, 0.45], "no-lrn": [0.42, 0.53, 0.47], "no-dropout": [0.40, 0.50, 0.45]}
    train = {"paper": 0.30, "no-lrn": 0.30, "no-dropout": 0.10}
    results = {}
    for variant, values in top1.items():
        for seed, err in enumerate(values):
            run = tmp_path / variant / f"seed{seed}"
            fake_run(run, err, err / 2, train[variant] + seed * 0.01 * (variant == "no-dropout"))
            results.setdefault(variant, {})[seed] = rep.run_result(run, "eval.json")
    variants = list(top1)
    costs = {v: rep.net_cost(2, True, 10) for v in variants}
    meta = {"records": "R", "classes": 10, "val_images": 20, "seeds": [0, 1, 2], "budget": "2 epochs"}
    summary = rep.write_report(tmp_path, results, variants, meta, costs)
    lrn = summary["no-lrn"]
    # differences 0.02, 0.03, 0.02: mean 0.02333, sd 0.005774, half 4.303 * 0.005774 / sqrt(3) = 0.014343
    d = lrn["difference"]["center_top1_err"]
    assert d["mean"] == pytest.approx(0.023333, abs=1e-6)
    assert d["low"] == pytest.approx(0.023333 - 0.014343, abs=1e-5)
    # 0.42, 0.53, 0.47: mean 0.473333, sd sqrt((0.05333^2 + 0.05667^2 + 0.00333^2) / 2) = 0.055076
    assert lrn["center_top1_err"]["mean"] == pytest.approx(0.473333, abs=1e-6)
    assert lrn["center_top1_err"]["sd"] == pytest.approx(0.055076, abs=1e-6)
    assert lrn["verdict"] == rep.CONSISTENT
    # no dropout: the same val error, a larger train-val gap (0.30-0.10=0.20 more, +-0.01): overfitting
    assert summary["no-dropout"]["difference"]["gap_top1"]["low"] > 0.15
    assert summary["no-dropout"]["verdict"] == rep.CONSISTENT
    md = (tmp_path / "ablation.md").read_text()
    assert "| no-lrn | 3 | 47.33 ± 5.51 |" in md and "+2.33 [+0.90, +3.77]" in md and "+1.40 / +1.20" in md
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["variants"]["no-lrn"]["verdict"] == rep.CONSISTENT


def test_cli_errors(tmp_path, capsys):
    for argv, message in ((["R", "--out", str(tmp_path), "--variants", "paper,no-such"], "--variants"),
                          (["--out", str(tmp_path)], "records folder is missing"),
                          (["R", "--out", str(tmp_path), "--seeds", "0"], "--seeds must be an integer >= 1"),
                          (["R", "--out", str(tmp_path), "--lr", "-1"], "variant paper")):
        with pytest.raises(SystemExit) as exc:
            ablate.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert ablate.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--gpus", ""]) == 2
    assert "meta.json" in capsys.readouterr().err


# --- end to end: a kill and a rerun give the uninterrupted experiment's table and weights ---------

TINY = ["--variants", "one-tower-half", "--seeds", "1", "--gpus", "", "--batch-size", "2", "--epochs", "2",
        "--epoch-steps", "2", "--budget-steps", "3", "--no-progress"]


def ablate_cmd(records, out):
    return [sys.executable, "-m", "tools.ablate", str(records), "--out", str(out), *TINY]


def weights(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_killed_and_rerun_equals_uninterrupted(sample_records, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run(ablate_cmd(sample_records, whole), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[2/2] one-tower-half seed 0 done" in done.stdout and "ETA" in done.stdout

    # kill the experiment while the paper run trains (after its run folder is announced)
    proc = subprocess.Popen(ablate_cmd(sample_records, broken), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = broken / "paper" / "seed0" / ablate.LOG
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "train: run folder" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "Rerun the same command" in text
    assert not (broken / "paper" / "seed0" / ablate.DONE).exists()
    assert (broken / "paper" / "seed0" / "last.pt").exists()           # saved where it stopped
    assert not (broken / "one-tower-half").exists()

    again = subprocess.run(ablate_cmd(sample_records, broken), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in log.read_text()
    a, b = (json.loads((d / "ablation.json").read_text()) for d in (whole, broken))
    assert a["variants"] == b["variants"] and a["runs"] == b["runs"]
    assert (whole / "ablation.md").read_text() == (broken / "ablation.md").read_text()
    for run in ("paper/seed0", "one-tower-half/seed0"):   # the same (variant, seed) twice: the same weights
        wa, wb = weights(whole / run), weights(broken / run)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), run
        assert json.loads((whole / run / "eval-last.json").read_text())["step"] == 3   # the budget, then evaluated

    # a third run of the command trains nothing and writes the same table
    third = subprocess.run(ablate_cmd(sample_records, broken), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0 and "2 of 2 runs already finished" in third.stdout
    assert json.loads((broken / "ablation.json").read_text())["variants"] == a["variants"]


def test_a_finished_run_is_found_again_on_other_devices_only(tmp_path):
    cfg = ablate.AblateConfig(records="R", out=str(tmp_path), gpus="0,1", workers=4, epochs=2)
    run = tmp_path / "paper" / "seed0"
    fake_run(run, 0.5, 0.2, 0.4)
    flags = ablate.run_flags(cfg, "paper", 0)
    (run / ablate.DONE).write_text(json.dumps({"flags": ablate.result_flags(flags), "eval": "eval.json"}))
    assert ablate.finished(run, flags) == "eval.json"
    elsewhere = ablate.AblateConfig(records="R", out=str(tmp_path), gpus="", epochs=2)
    assert ablate.finished(run, ablate.run_flags(elsewhere, "paper", 0)) == "eval.json"   # another machine
    longer = ablate.AblateConfig(records="R", out=str(tmp_path), gpus="0,1", workers=4, epochs=3)
    assert ablate.finished(run, ablate.run_flags(longer, "paper", 0)) is None             # a longer budget
    assert ablate.finished(run, ablate.run_flags(cfg, "paper", 1)) is None                # another seed
