"""The ablation's reading: per-variant error over seeds, paired differences from ``paper`` with a
t interval, the paper's claims beside them, a verdict, and what each variant costs.

Pure functions over numbers and run folders (``metrics.jsonl`` + the final evaluation): no
torch, no DALI; matplotlib only when the PNG is drawn. ``tools/ablate.py`` trains the runs and
calls ``write_report``.

Errors are fractions (0.25 = 25%) in the JSON; the Markdown shows percentage points.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from common.atomic import write_json, write_text
from common.errors import UserError

# --- the paper's claims (section 3), as "variant minus paper" in error points (fractions) -------

@dataclass(frozen=True)
class Claim:
    top1: float | None          # claimed error increase of the variant over the paper's net
    top5: float | None
    text: str                   # the paper's words
    at_least: bool = False      # "over 1%": a lower bound, not a point value
    gap: bool = False           # the claim is about overfitting: judged on the train-val gap


CLAIMS: dict[str, Claim] = {
    "no-lrn": Claim(0.014, 0.012, "LRN reduces top-1 / top-5 error by 1.4% / 1.2%"),
    "no-overlap": Claim(0.004, 0.003, "overlapping pooling reduces top-1 / top-5 error by 0.4% / 0.3%"),
    "no-dropout": Claim(None, None, "without dropout the net shows substantial overfitting", gap=True),
    "no-lighting": Claim(0.01, None, "PCA lighting reduces top-1 error by over 1%", at_least=True),
    "one-tower-half": Claim(0.017, 0.012, "two towers reduce top-1 / top-5 error by 1.7% / 1.2% "
                            "against the one-GPU net with half the kernels per conv layer"),
}

CONSISTENT = "consistent with the paper"
UNDECIDED = "not distinguishable at this size"
CONTRADICTS = "contradicts"
NOT_RUN = "no runs paired with paper yet"
CONFIDENCE = 0.95


# --- Student's t, without scipy (not a dependency) -----------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (0.5 < p < 1), by bisection on ``t_cdf`` (to ~1e-12)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Paired:
    """The mean of per-seed differences and its two-sided t interval (None with one pair)."""
    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None


def paired_interval(variant: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> Paired:
    """Differences variant[k] - baseline[k], paired by seed k: mean ± t_{(1+c)/2, n-1} · sd / √n."""
    if len(variant) != len(baseline) or not variant:
        raise ValueError("paired_interval needs two equally long, non-empty lists (one value per seed)")
    diffs = [v - b for v, b in zip(variant, baseline)]
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return Paired(1, mean, None, None, None)
    sd = statistics.stdev(diffs)
    half = t_quantile((1.0 + confidence) / 2.0, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, sd, mean - half, mean + half)


def judge(diff: Paired, claimed_worse: bool = True) -> str:
    """The verdict on one difference: the interval on the paper's side of 0 (the variant worse,
    or for the gap: larger), on the other side, or straddling 0 (or no interval: one seed)."""
    if diff.low is None:
        return UNDECIDED
    if diff.low > 0:
        return CONSISTENT if claimed_worse else CONTRADICTS
    if diff.high < 0:
        return CONTRADICTS if claimed_worse else CONSISTENT
    return UNDECIDED


def overall(verdicts: Iterable[str]) -> str:
    verdicts = list(verdicts)
    if not verdicts:
        return UNDECIDED
    if CONTRADICTS in verdicts:
        return CONTRADICTS
    return CONSISTENT if all(v == CONSISTENT for v in verdicts) else UNDECIDED


# --- what a variant costs: parameters and multiply-accumulates per image --------------------------

def pooled(size: int, overlap: bool) -> int:
    """A max-pool's output size: 3x3 stride 2 (overlapping) or 2x2 stride 2, no padding."""
    kernel = 3 if overlap else 2
    return (size - kernel) // 2 + 1


def feature_sizes(overlap: bool, image: int = 224) -> dict[str, int]:
    """Spatial size after each stage. Overlapping or not, 55 -> 27 -> 13 -> 6: the paper's
    s = z = 2 pooling "produces output of equivalent dimensions", so fc6 reads 256 x 6 x 6."""
    conv1 = (image + 2 * 2 - 11) // 4 + 1
    pool1 = pooled(conv1, overlap)
    pool2 = pooled(pool1, overlap)       # conv2 (5x5 pad 2) keeps the size
    pool5 = pooled(pool2, overlap)       # conv3..5 (3x3 pad 1) keep it
    return {"conv1": conv1, "pool1": pool1, "conv2": pool1, "pool2": pool2, "conv3": pool2, "conv4": pool2,
            "conv5": pool2, "pool5": pool5}


def net_cost(towers: int, overlap_pool: bool, classes: int) -> dict[str, int]:
    """Parameters and multiply-accumulates per image (convolutions and fully connected layers;
    ReLU, LRN and pooling are not counted) of the net, from the layer table in model/alexnet.py."""
    from model.alexnet import CONVS, tower_widths   # the model's own layer table
    sizes = feature_sizes(overlap_pool)
    convs, fc = tower_widths(towers)
    params = macs = 0
    in_ch = 3
    for spec, out in zip(CONVS, convs):
        fan_in = (in_ch * towers if spec.reads == "all" else in_ch) * spec.kernel ** 2
        params += towers * out * (fan_in + 1)
        macs += towers * out * fan_in * sizes[spec.name] ** 2
        in_ch = out
    flat = towers * convs[-1] * sizes["pool5"] ** 2
    for fan_in, out in ((flat, towers * fc), (towers * fc, towers * fc), (towers * fc, classes)):
        params += out * (fan_in + 1)
        macs += out * fan_in
    return {"params": params, "macs": macs}


# --- reading the run folders ------------------------------------------------------------------

class ReportError(UserError):
    """A run folder the report cannot read; one line."""


def read_history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def read_eval(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return {view: {k: float(data[view][k]) for k in ("top1_err", "top5_err")} for view in ("center", "tencrop")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path}: not a final evaluation ({getattr(exc, 'strerror', None) or exc})") from None


def run_result(run: Path, eval_file: str) -> dict:
    """One run's numbers: final single-crop and 10-crop error, the last epoch's train-val gap
    (top-1, centre crop; the train error is measured on the augmented crops, under dropout, as
    the paper's training error was), and the per-epoch train loss."""
    history = read_history(run)
    result = read_eval(run / eval_file)
    last = history[-1] if history else None
    gap = None if last is None else last["val_top1_err"] - last["train_top1_err"]
    curve = [[m["step"], m["train_loss"]] for m in history]
    return {**result, "gap_top1": gap, "train_loss": curve}


# --- the table ------------------------------------------------------------------------------

METRICS = (("center", "top1_err"), ("center", "top5_err"), ("tencrop", "top1_err"), ("tencrop", "top5_err"))


def summarise(results: dict[str, dict[int, dict]], variants: Sequence[str], costs: dict[str, dict]) -> dict:
    """The experiment's numbers per variant from ``results[variant][seed]`` (runs done so far)."""
    base = results.get("paper", {})
    out = {}
    for name in variants:
        runs = results.get(name, {})
        seeds = sorted(runs)
        row: dict = {"seeds": seeds, "params": costs[name]["params"], "macs": costs[name]["macs"],
                     "params_change": costs[name]["params"] - costs["paper"]["params"],
                     "macs_change": costs[name]["macs"] - costs["paper"]["macs"]}
        for view, key in METRICS:
            values = [runs[s][view][key] for s in seeds]
            row[f"{view}_{key}"] = _spread(values)
        row["gap_top1"] = _spread([runs[s]["gap_top1"] for s in seeds if runs[s]["gap_top1"] is not None])
        if name != "paper":
            paired = [s for s in seeds if s in base]
            row["paired_seeds"] = paired
            diffs = {}
            for view, key in METRICS:
                diffs[f"{view}_{key}"] = _paired([runs[s][view][key] for s in paired],
                                                 [base[s][view][key] for s in paired])
            gaps = [s for s in paired if runs[s]["gap_top1"] is not None and base[s]["gap_top1"] is not None]
            diffs["gap_top1"] = _paired([runs[s]["gap_top1"] for s in gaps], [base[s]["gap_top1"] for s in gaps])
            row["difference"] = diffs
            claim = CLAIMS.get(name)
            row["claim"] = None if claim is None else {"top1": claim.top1, "top5": claim.top5, "text": claim.text,
                                                       "at_least": claim.at_least}
            row["verdict"] = verdict(name, diffs)
        out[name] = row
    return out


def verdict(name: str, diffs: dict) -> str:
    """Judged on the single-crop differences the paper claims (top-1, and top-5 where it gives
    one); the dropout variant on the train-val gap (larger without dropout = overfitting)."""
    claim = CLAIMS.get(name)
    if not diffs or all(d is None for d in diffs.values()):
        return NOT_RUN
    if claim is None:
        return UNDECIDED
    if claim.gap:
        keys = ["gap_top1"]
    else:
        keys = [k for k, c in (("center_top1_err", claim.top1), ("center_top5_err", claim.top5)) if c is not None]
    judged = []
    for key in keys:
        d = diffs.get(key)
        if d is None:
            continue
        judged.append(judge(Paired(d["n"], d["mean"], d["sd"], d["low"], d["high"])))
    return overall(judged)


def _spread(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None}


def _paired(variant: list[float], baseline: list[float]) -> dict | None:
    if not variant:
        return None
    p = paired_interval(variant, baseline)
    return {"n": p.n, "mean": p.mean, "sd": p.sd, "low": p.low, "high": p.high}


# --- Markdown ---------------------------------------------------------------------------------

def _pp(x: float | None, sign: bool = False) -> str:
    """A fraction as percentage points: 0.0123 -> '1.23'."""
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def _mean_sd(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    return _pp(s["mean"]) + ("" if s["sd"] is None else f" ± {_pp(s['sd'])}")


def _diff(d: dict | None) -> str:
    if d is None:
        return "–"
    if d["low"] is None:
        return f"{_pp(d['mean'], True)} (no interval)"
    return f"{_pp(d['mean'], True)} [{_pp(d['low'], True)}, {_pp(d['high'], True)}]"


def _claim(c: dict | None, key: str) -> str:
    if c is None or c[key] is None:
        return "–"
    return ("> " if c["at_least"] else "") + _pp(c[key], True)


def _count(n: int) -> str:
    return f"{n / 1e6:+.2f} M" if n else "0"


CHANGES = {
    "paper": "the paper's net and recipe (two towers, LRN, 3x3/2 pooling, dropout 0.5, PCA lighting 0.1)",
    "no-lrn": "no local response normalisation after conv1 and conv2 (its window sums of squares, ~2.4 M "
              "multiply-adds per image, are not counted in MACs)",
    "no-overlap": "max-pooling 2x2 stride 2 instead of 3x3 stride 2; maps stay 55 -> 27 -> 13 -> 6, so fc6 "
                  "still reads 256 x 6 x 6 (4 comparisons per output instead of 9)",
    "no-dropout": "dropout 0 on the outputs of fc6 and fc7 (the paper: 0.5)",
    "no-lighting": "no PCA lighting on the training crops (the same crops and mirrors)",
    "one-tower-half": "one tower: conv1-conv4 with half the kernels (48/128/192/192), conv5 256 and fc6/fc7 4096 "
                      "as in the paper's footnote; every conv reads all channels",
}


def markdown(summary: dict, meta: dict) -> str:
    seeds = meta["seeds"]
    lines = [f"# Ablation: the paper's section 3 on {meta['records']}", "",
             f"{meta['classes']} classes, {meta['val_images']} validation images; {len(seeds)} seed(s) per variant "
             f"({', '.join(map(str, seeds))}); budget: {meta['budget']}."
             + ("" if meta.get("complete", True) else " **Partial: the runs finished so far.**"), "",
             "Error in % (mean ± sd over seeds); difference = variant − paper in percentage points, paired by seed, "
             f"with its {int(CONFIDENCE * 100)}% t interval; the verdict reads the single-crop intervals against the "
             "paper's claims (consistent = the interval lies on the paper's side of 0).", "",
             "| variant | seeds | top-1 (1 crop) | top-5 (1 crop) | top-1 (10 crops) | top-5 (10 crops) "
             "| Δ top-1 (1 crop) | Δ top-5 (1 crop) | Δ top-1 (10 crops) | Δ top-5 (10 crops) "
             "| paper's Δ top-1 / top-5 | val − train top-1 | Δ gap | verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, row in summary.items():
        d = row.get("difference", {})
        claim = row.get("claim")
        if name == "paper" or claim is None:
            paper_claim = "–"
        elif claim["top1"] is None and claim["top5"] is None:
            paper_claim = "larger gap (overfitting)"
        else:
            paper_claim = f"{_claim(claim, 'top1')} / {_claim(claim, 'top5')}"
        lines.append(" | ".join([
            f"| {name}", str(len(row["seeds"])),
            *[_mean_sd(row[f"{v}_{k}"]) for v, k in METRICS],
            *(["–"] * 4 if name == "paper" else [_diff(d.get(f"{v}_{k}")) for v, k in METRICS]),
            paper_claim, _mean_sd(row["gap_top1"]),
            "–" if name == "paper" else _diff(d.get("gap_top1")),
            "baseline" if name == "paper" else row["verdict"]]) + " |")
    lines += ["", "| variant | what it changes | parameters | Δ parameters | MACs / image | Δ MACs |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, row in summary.items():
        lines.append(f"| {name} | {CHANGES.get(name, '')} | {row['params']:,} | {_count(row['params_change'])} "
                     f"| {row['macs']:,} | {_count(row['macs_change'])} |")
    lines += ["", "MACs: multiply-accumulates of the convolutions and fully connected layers per 224x224 image. "
              "The paper's claims are for ImageNet after ~90 epochs; a small set and budget can show a direction, "
              "not the paper's sizes.", ""]
    return "\n".join(lines)


# --- the chart ------------------------------------------------------------------------------

def draw_curves(path: Path, summary: dict, results: dict[str, dict[int, dict]]) -> None:
    """Train loss per epoch end (x: optimiser step), one colour per variant, one line per seed."""
    from common.charts import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(summary):
        for j, seed in enumerate(sorted(results.get(name, {}))):
            curve = results[name][seed]["train_loss"]
            if not curve:
                continue
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o", markersize=3, color=colours[i % len(colours)], alpha=0.8,
                    label=name if j == 0 else None)
    ax.set_xlim(left=0)
    ax.xaxis.get_major_locator().set_params(integer=True)   # steps are whole numbers
    ax.set_xlabel("optimiser step (one point per epoch, from metrics.jsonl)")
    ax.set_ylabel("train loss (mean over the epoch)")
    ax.set_title("Train loss per variant (one line per seed)", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(out: Path, results: dict[str, dict[int, dict]], variants: Sequence[str], meta: dict,
                 costs: dict[str, dict], draw: bool = True) -> dict:
    """DIR/ablation.json, ablation.md and (``draw``) ablation.png; returns the summary.
    ``costs``: ``net_cost`` of each variant's net (``paper`` included)."""
    summary = summarise(results, variants, costs)
    write_json(out / "ablation.json", {"meta": meta, "variants": summary,
                                       "runs": {v: {str(s): r for s, r in sorted(results.get(v, {}).items())}
                                                for v in variants}})
    write_text(out / "ablation.md", markdown(summary, meta))
    if draw:
        draw_curves(out / "ablation.png", summary, results)
    return summary
