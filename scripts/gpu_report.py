"""The GPU check's report: what each step records (``Step``) and the three files rewritten after
every step, gpu_check.json (everything), gpu_check.md (the summary and the numbers against the
targets) and gpu_check.log (each step's output). scripts/gpu_check.py has the details."""
from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.atomic import write_json, write_text

if TYPE_CHECKING:
    from gpu_runner import Check

# Everything this ever writes into the report folder (a device call brings back at most 8 files).
REPORT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log")
# the targets the numbers are read against (images/s of the model on one H100/H200 today)
MODEL_TARGET = 1.3 * 11_200
LOG_TAIL = 200_000        # bytes of each stream of each step kept in gpu_check.log


@dataclass
class Step:
    name: str
    command: list[str]
    status: str = "pending"       # running | passed | failed | timeout | stopped | skipped
    returncode: int | None = None
    seconds: float = 0.0
    output_tail: str = ""         # the end of stdout, then the end of stderr
    note: str = ""
    results: dict = field(default_factory=dict)   # the few numbers the summary shows
    data: dict = field(default_factory=dict)      # the bench's or profile's whole JSON


def tail(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def targets(steps: list[Step]) -> list[str]:
    """The numbers read against the targets; a number the engine does not report yet says so."""
    by = {s.name: s for s in steps}
    lines = []
    one = by.get("train one device")
    prof = one.data if one else {}
    e2e, model = prof.get("end_to_end_images_per_s"), prof.get("model_images_per_s")
    if e2e and model:
        lines.append(f"- end-to-end {e2e:.0f} img/s ÷ in-loop model {model:.0f} img/s = {e2e / model:.3f} "
                     f"(target ≥ 0.9); stall {100 * (1 - e2e / model):.1f}% (target < 3%); "
                     f"warm-up dropped: {prof.get('warmup_steps', '?')} steps")
    else:
        lines.append("- end-to-end ÷ in-loop model rate: not measured (profile.json has no "
                     "end_to_end_images_per_s / model_images_per_s)")
    if "data_stall_percent" in prof:
        lines.append(f"- profiled data stall: {_fmt(prof['data_stall_percent'])}% "
                     f"at {_fmt(prof.get('images_per_s', 0))} img/s")
    bench = by.get("model bench bf16 channels_last")
    if bench and bench.results.get("ours"):
        what = "optimiser included" if bench.data.get("optimizer") else "forward + backward only"
        lines.append(f"- model bf16 channels_last: {_fmt(bench.results['ours'])} img/s ({what}); "
                     f"target ≥ {MODEL_TARGET:.0f} (1.3 × 11.2k)")
    comp = by.get("train compile")
    if comp and comp.data.get("images_per_s") and prof.get("images_per_s"):
        lines.append(f"- --compile: {_fmt(comp.data['images_per_s'])} img/s vs eager {_fmt(prof['images_per_s'])}")
    return lines


def render_markdown(report: dict, steps: list[Step]) -> str:
    env = report["environment"]
    state = (f"stopped by {report['stopped']}" if report["stopped"] else
             f"error in the check: {report['error'].splitlines()[-1]}" if report["error"] else
             "finished" if report["finished"] else "running")
    lines = [f"# GPU check, {report['date']}", "",
             f"- mode: {'dry run (CPU, tiny sizes)' if report['dry_run'] else 'GPU'}; {state}",
             f"- GPUs: {', '.join(env.get('gpus') or []) or 'none'}",
             f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, DALI {env.get('dali')}, "
             f"Python {env.get('python')}",
             f"- total: {report['seconds']:.0f} s of a {report['budget']:.0f} s budget", "",
             "| step | status | s | results |", "|---|---|---:|---|"]
    for s in steps:
        res = "; ".join(f"{k}: {_fmt(v)}" for k, v in s.results.items()
                        if k not in ("executable", "dali_from") and (v or k != "missing"))
        res = "; ".join(x for x in (res, s.note) if x)
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {res.replace('|', '/')} |")
    lines += ["", "## Against the targets", "", *targets(steps)]
    for s in steps:
        if s.status in ("failed", "timeout", "stopped"):
            lines += ["", f"## {s.name}: {s.status}", "", "```", s.output_tail[-1500:], "```"]
    if report["error"]:
        lines += ["", "## error in the check", "", "```", report["error"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def write_report(check: Check) -> str:
    """The report files into the report folder (atomically); returns the Markdown."""
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": check.dry, "budget": check.budget, "seconds": round(time.monotonic() - check.start, 1),
              "finished": check.finished, "stopped": check.stopped, "error": check.error,
              "environment": check.environment, "work": str(check.work), "steps": [asdict(s) for s in check.steps]}
    write_json(check.report / REPORT_FILES[0], report)
    markdown = render_markdown(report, check.steps)
    write_text(check.report / REPORT_FILES[1], markdown)
    log = []
    for i, s in enumerate(check.steps, 1):
        if s.command:
            log += [f"===== {s.name}: {s.status} ({s.seconds:.0f} s)", "$ " + " ".join(s.command),
                    "----- stdout", tail(check.work / "logs" / f"{i:02d}.out", LOG_TAIL),
                    "----- stderr", tail(check.work / "logs" / f"{i:02d}.err", LOG_TAIL)]
    write_text(check.report / REPORT_FILES[2], "\n".join(log) + "\n")
    return markdown
