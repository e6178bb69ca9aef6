"""The GPU check: everything a machine with a GPU should measure, in one call of a few minutes.

    bash scripts/gpu_check.sh REPORT_DIR                # on the GPU machine
    bash scripts/gpu_check.sh REPORT_DIR --dry-run      # no CUDA needed: CPU, tiny sizes

Made for a lent machine with no network and at most 8 files brought back per call. Steps, in
order, each a subprocess (its own process group) with its own time limit; a failing step is
recorded and the next one still runs; a step that no longer fits the --budget is skipped and
says so: the environment (torch, CUDA, GPUs, DALI, probed in the steps' own environment), the
``gpu``-marked tests (correctness first), the model bench (fp32; bf16 + channels_last; fp16 +
channels_last), a sample record set whose train shards are repeated so an epoch is 1,000 steps
of 128, the loader bench (dali, dali-u8, torch, decode), then ``train.py --profile`` runs: bf16
+ channels_last on one GPU, the same with ``--compile``, with ``--amp fp16``, with the loader
on the CPU, and on two GPUs where two exist.

Every step's subprocess gets the caller's PYTHONPATH with this checkout in front (the dali-kit's
/tmp/site stays visible). Nothing is installed on a machine without a package registry; DALI
and torch never are (a missing DALI is one line naming the dali-kit). The report is rewritten
after every step and on any exit (an error, SIGTERM, SIGINT, SIGHUP), so a stopped call still
brings back what it measured: REPORT_DIR/gpu_check.json (every step: command, status, seconds,
output tails, parsed results, the benches' and profiles' JSON), gpu_check.md (the summary and
the numbers against the targets) and gpu_check.log (each step's output). Scratch (records, run
folders, traces) goes to --work, outside the report folder. Exit status: 0 when every step that
ran passed, 1 when one failed, 2 for bad arguments or no usable torch/GPU, 128+N when stopped by
signal N.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # run as a file: import the project from this checkout
    sys.path.insert(0, str(ROOT))

from common.atomic import write_json, write_text  # noqa: E402
from common.config import Parser  # noqa: E402

# The project's entry points this check runs (after ``python``): a module that moves is a
# one-line change here.
ENTRY = {
    "sample set": ("-m", "prep.sample"),
    "records": ("prep/build_records.py",),
    "model bench": ("-m", "bench.model"),
    "loader bench": ("-m", "bench.loaders"),
    "train": ("train.py",),
    "tests": ("-m", "pytest"),
}
# Everything this ever writes into the report folder (a device call brings back at most 8 files).
REPORT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log")
DALI_KIT = "../shared/device/dali-kit"
# Installed only when missing and a package registry answers; torch and DALI never are (a GPU
# machine's own CUDA build must not be swapped, and DALI's CUDA major must match its driver).
SMALL_PACKAGES = {"pytest": "pytest", "rich": "rich", "numpy": "numpy", "PIL": "pillow",
                  "matplotlib": "matplotlib"}
# profile.json keys of the in-loop rates (read when the engine writes them): the unprofiled
# end-to-end rate and the same loop's rate on a batch already on the device, both in images/s
# after the warm-up steps (``warmup_steps``) are dropped.
PROFILE_KEYS = ("steps", "images_per_s", "data_stall_percent", "step_ms",
                "warmup_steps", "end_to_end_images_per_s", "model_images_per_s")
# the targets the numbers are read against (images/s of the model on one H100/H200 today)
MODEL_TARGET = 1.3 * 11_200
LOG_TAIL = 200_000        # bytes of each stream of each step kept in gpu_check.log


@dataclass(frozen=True)
class Sizes:
    """Everything the dry run shrinks."""
    device: str
    classes: int
    per_class: int           # train images per class actually encoded
    repeat: int              # train shards listed this many times (epoch = classes*per_class*repeat)
    loader_args: tuple[str, ...]
    model_args: tuple[str, ...]
    train_args: tuple[str, ...]
    short_run: tuple[str, ...]    # the shorter runs (compile, CPU loader)
    gpus_one: str
    gpus_two: str | None
    test_paths: tuple[str, ...]   # where the gpu-marked tests are collected from

    @classmethod
    def for_run(cls, dry: bool, gpu_count: int) -> "Sizes":
        if dry:
            return cls(device="cpu", classes=4, per_class=12, repeat=2,
                       loader_args=("--batch-size", "8", "--batches", "2", "--warmup", "1",
                                    "--repeats", "1", "--threads", "1"),
                       model_args=("--batch-size", "1", "--steps", "1", "--repeats", "1", "--warmup", "0"),
                       train_args=("--batch-size", "4", "--max-steps", "2", "--epochs", "1", "--workers", "1"),
                       short_run=(), gpus_one="", gpus_two=None,
                       # the light test modules only: collecting all of them costs ~20 s on 2 cores
                       test_paths=("tests/test_model.py", "tests/test_precision.py"))
        # 10 classes x 160 images x 80 = 128,000 train images = 1,000 steps of 128 per epoch
        return cls(device="cuda:0", classes=10, per_class=160, repeat=80,
                   loader_args=("--batch-size", "128", "--batches", "20", "--warmup", "5", "--repeats", "3"),
                   model_args=("--batch-size", "128", "--steps", "10", "--repeats", "3", "--warmup", "3"),
                   train_args=("--batch-size", "128", "--max-steps", "1000", "--epochs", "1"),
                   short_run=("--max-steps", "300"),
                   gpus_one="0", gpus_two="0,1" if gpu_count >= 2 else None, test_paths=("tests",))


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


class Stopped(BaseException):
    """A signal asked the check to stop (BaseException: no step's ``except Exception`` eats it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Check:
    """Runs the steps against a time budget and keeps the report on disk up to date."""

    def __init__(self, report: Path, work: Path, budget: float, dry: bool):
        self.report, self.work, self.budget, self.dry = report, work, budget, dry
        self.start = time.monotonic()
        self.steps: list[Step] = []
        self.environment: dict = {}
        self.stopped: str | None = None        # the signal's name
        self.error: str | None = None          # an error of the check itself
        self.finished = False
        self._signum: int | None = None
        self._writing = self._raised = False
        # the caller's PYTHONPATH stays (the dali-kit's /tmp/site); this checkout goes first
        path = [str(ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    # -- signals: a handler raises Stopped, except while the report is being written
    def on_signal(self, signum, _frame) -> None:
        if self._signum is None:
            self._signum, self.stopped = signum, signal.Signals(signum).name
        if not self._writing and not self._raised:
            self._raised = True
            raise Stopped(signum)

    def save(self) -> None:
        self._writing = True
        try:
            write_report(self)
        finally:
            self._writing = False
        if self._signum is not None and not self._raised:
            self._raised = True
            raise Stopped(self._signum)

    def skip(self, name: str, note: str) -> Step:
        step = Step(name, [], status="skipped", note=note)
        self.steps.append(step)
        self.save()
        return step

    def run(self, name: str, command: list, limit: float, need: float | None = None,
            env: dict | None = None) -> Step:
        """Run ``command`` from the repository root for at most ``limit`` s (less if the budget
        is running out); skipped when less than ``need`` s (default: a third of limit) is left."""
        need = limit / 3 if need is None else need
        if self.left() < need:
            return self.skip(name, f"budget: {max(0.0, self.left()):.0f} s left, needs ~{need:.0f} s")
        step = Step(name, [str(c) for c in command], status="running")
        self.steps.append(step)
        logs = self.work / "logs"
        out_path, err_path = (logs / f"{len(self.steps):02d}.{s}" for s in ("out", "err"))
        began = time.monotonic()
        proc = None
        try:
            self.save()
            logs.mkdir(parents=True, exist_ok=True)
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(step.command, cwd=ROOT, stdout=out, stderr=err,
                                        env={**self.env, **(env or {})}, start_new_session=True)
                try:
                    step.returncode = proc.wait(timeout=max(1.0, min(limit, self.left())))
                    step.status = "passed" if step.returncode == 0 else "failed"
                except subprocess.TimeoutExpired:
                    step.status, step.note = "timeout", f"stopped after {time.monotonic() - began:.0f} s"
        except OSError as exc:
            step.status, step.note = "failed", f"{type(exc).__name__}: {exc}"
        except Stopped:
            step.status, step.note = "stopped", f"stopped by {self.stopped}"
            raise
        finally:
            if proc is not None:
                _end_group(proc)
            step.seconds = round(time.monotonic() - began, 1)
            step.output_tail = (_tail(out_path, 3000) + "\n" + _tail(err_path, 3000)).strip()
            if step.status != "stopped":
                self.save()
        return step

    def stdout(self, step: Step) -> str:
        return _tail(self.work / "logs" / f"{self.steps.index(step) + 1:02d}.out", 1_000_000)

    def parse(self, step: Step, parse) -> None:
        """Fill ``step``'s results with ``parse()``; a parse that fails is noted, not fatal."""
        try:
            parse()
        except Exception as exc:  # an unexpected file from a bench must not lose the report
            step.note = (step.note + f"; results unreadable: {type(exc).__name__}: {exc}").lstrip("; ")
        self.save()


def _end_group(proc: subprocess.Popen) -> None:
    """The step's process and everything it started: SIGTERM, 5 s, SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:     # the leader is gone: make sure nothing it started stays
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break


def _tail(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def python(entry: str, *args) -> list:
    return [sys.executable, *ENTRY[entry], *args]


# ----------------------------------------------------------------------------- steps

PROBE = r"""
import importlib.util, json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "missing": []}
for name in %r:
    try:
        if importlib.util.find_spec(name) is None:
            info["missing"].append(name)
    except ModuleNotFoundError:
        info["missing"].append(name)
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import nvidia.dali as dali
    info.update(dali=dali.__version__,
                dali_from=os.path.dirname(os.path.dirname(os.path.dirname(dali.__file__))))
except Exception as exc:
    info["dali_error"] = f"{type(exc).__name__}: {exc}"
print("gpu_check-probe " + json.dumps(info))
"""


def probe(check: Check, name: str = "environment") -> Step:
    """torch, CUDA, the GPUs, DALI and what is missing, as the steps' subprocesses see them;
    read from the probe's own stdout line (a warning on stderr is only output)."""
    step = check.run(name, [sys.executable, "-c", PROBE % (list(SMALL_PACKAGES),)], 90, need=0)
    lines = [ln for ln in check.stdout(step).splitlines() if ln.startswith("gpu_check-probe ")]
    info = json.loads(lines[-1].split(" ", 1)[1]) if lines else {}
    smi = shutil.which("nvidia-smi")
    if smi and not check.dry:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = done.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    step.results = info
    return step


def registry_answers(timeout: float = 3.0) -> bool:
    """Whether pip's index can be reached (a TCP connection to it), without waiting on pip."""
    if os.environ.get("PIP_NO_INDEX", "").lower() not in ("", "0", "false", "no", "off"):
        return False
    url = urllib.parse.urlsplit(os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def step_environment(check: Check, no_install: bool) -> dict:
    step = probe(check)
    info = step.results
    notes = []
    missing = info.get("missing", [])
    if missing:
        if no_install or not registry_answers():
            notes.append(f"missing {', '.join(missing)}; no package registry (or --no-install): not installed")
        else:
            inst = check.run("install", [sys.executable, "-m", "pip", "install", "-q",
                                         *(SMALL_PACKAGES[m] for m in missing)], 180)
            if inst.status == "passed":
                info = {**info, **probe(check, "environment again").results}
    if "dali" not in info:
        notes.append(f"DALI is not importable ({info.get('dali_error', 'no probe output')}): bring it with "
                     f"{DALI_KIT}, then export PYTHONPATH=/tmp/site:$PWD")
        print(f"gpu_check: {notes[-1]}", file=sys.stderr)
    if "torch" not in info:
        notes.append(f"torch is not importable ({info.get('torch_error', 'no probe output')}); "
                     "this check never installs torch")
    step.note = "; ".join(notes)
    check.environment = info
    check.save()
    return info


def step_gpu_tests(check: Check, sizes: Sizes) -> None:
    # a module that cannot be imported here (FFCV missing) must not hide the other GPU tests
    step = check.run("gpu tests", python("tests", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                         "--continue-on-collection-errors", *sizes.test_paths), 150, need=30)
    last = [ln for ln in check.stdout(step).splitlines() if ln.strip()][-1:]
    step.results = {"summary": last[0].strip("= ")} if last else {}
    check.save()


MODEL_CONFIGS = (("fp32", ()), ("bf16 channels_last", ("--amp", "bf16", "--channels-last")),
                 ("fp16 channels_last", ("--amp", "fp16", "--channels-last")))


def step_model_bench(check: Check, sizes: Sizes) -> None:
    for label, args in MODEL_CONFIGS:
        out = check.work / f"model_bench_{label.split()[0]}.json"
        out.unlink(missing_ok=True)
        step = check.run(f"model bench {label}", python("model bench", "--device", sizes.device, *args,
                                                        *sizes.model_args, "--no-progress", "--json", out), 60)

        def parse(step=step, out=out):
            step.data = _load_json(out)
            step.results = dict(step.data.get("median_images_per_s", {}))
            if "optimizer" in step.data:
                step.results["optimizer"] = step.data["optimizer"]
        check.parse(step, parse)


def step_records(check: Check, sizes: Sizes) -> Path | None:
    """A sample set built small, then its train shards listed ``repeat`` times (symlinks)."""
    src, rec, big = check.work / "src", check.work / "records", check.work / "records-repeated"
    for path in (src, rec, big):
        shutil.rmtree(path, ignore_errors=True)
    step = check.run("sample set", python("sample set", src, "--classes", sizes.classes, "--train-per-class",
                                          sizes.per_class, "--val-per-class", 10), 120)
    if step.status != "passed":
        return None
    step = check.run("records", python("records", "--source", src, "--out", rec, "--no-progress"), 120)
    if step.status != "passed":
        return None
    try:
        repeat_shards(rec, big, sizes.repeat)
        step.results = {"train_images": json.loads((big / "meta.json").read_text())["counts"]["train"],
                        "repeat": sizes.repeat, "folder": str(big)}
    except (OSError, ValueError, KeyError) as exc:
        step.status, step.note = "failed", f"repeating the shards: {type(exc).__name__}: {exc}"
        big = None
    check.save()
    return big


def repeat_shards(rec: Path, out: Path, repeat: int) -> None:
    """A records folder whose train split is ``rec``'s shards ``repeat`` times over (symlinks,
    distinct names), so an epoch is ``repeat`` times longer without encoding more JPEGs."""
    (out / "train").mkdir(parents=True)
    meta = json.loads((rec / "meta.json").read_text())
    shards = []
    for r in range(repeat):
        for rel in meta["shards"]["train"]:
            tar = rec / rel
            name = f"r{r:03d}-{tar.name}"
            (out / "train" / name).symlink_to(tar.resolve())
            (out / "train" / name).with_suffix(".idx").symlink_to(tar.with_suffix(".idx").resolve())
            shards.append(f"train/{name}")
    meta["shards"]["train"] = shards
    meta["counts"]["train"] *= repeat
    for item in rec.iterdir():
        if item.name not in ("train", "meta.json"):
            (out / item.name).symlink_to(item.resolve())
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def step_loader_bench(check: Check, sizes: Sizes, records: Path) -> None:
    out = check.work / "loader_bench.json"
    out.unlink(missing_ok=True)
    step = check.run("loader bench", python("loader bench", "--records", records,
                                            "--loaders", "dali,dali-u8,torch,decode", "--device", sizes.device,
                                            *sizes.loader_args, "--no-progress", "--json", out), 120)

    def parse():
        step.data = _load_json(out)
        step.results = {n: {k: e.get(k) for k in ("images_per_s", "vs_decode", "finish_images_per_s") if k in e}
                        for n, e in step.data.get("loaders", {}).items()}
    check.parse(step, parse)


def step_train(check: Check, sizes: Sizes, records: Path, label: str, gpus: str, flags: tuple[str, ...],
               limit: float = 150, need: float | None = None, env: dict | None = None, note: str = "") -> None:
    """One ``train.py --profile`` run; ``flags`` come after the sizes, so they may override them."""
    run_dir = check.work / "runs" / label.replace(" ", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    step = check.run(f"train {label}", python("train", "--records", records, "--gpus", gpus, *sizes.train_args,
                                              *flags, "--profile", "--no-final-eval", "--no-progress",
                                              "--out", run_dir), limit, need=need, env=env)
    if step.status == "skipped":
        return

    def parse():
        step.data = _load_json(run_dir / "profile.json")
        step.results = {k: step.data[k] for k in PROFILE_KEYS if k in step.data}
        step.note = (step.note + "; " + note).strip("; ") if note else step.note
    check.parse(step, parse)


def run_all(check: Check, args) -> int:
    env = step_environment(check, args.no_install)
    if "torch" not in env:
        print(f"error: torch not importable by {sys.executable}; this check never installs torch", file=sys.stderr)
        return 2
    gpu_count = len(env.get("gpus") or [])
    if not args.dry_run and gpu_count == 0:
        print("error: no CUDA GPU visible to torch; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    sizes = Sizes.for_run(args.dry_run, gpu_count)
    step_gpu_tests(check, sizes)
    step_model_bench(check, sizes)
    if "dali" not in env:
        for name in ("loader bench", "training runs"):
            check.skip(name, f"no DALI: bring it with {DALI_KIT}")
    elif (records := step_records(check, sizes)) is None:
        for name in ("loader bench", "training runs"):
            check.skip(name, "no records")
    else:
        step_loader_bench(check, sizes, records)
        fast = () if args.dry_run else ("--amp", "bf16", "--channels-last")
        step_train(check, sizes, records, "one device", sizes.gpus_one, fast)
        # compiling on a CPU takes minutes: the dry run only checks the flag's path, eagerly
        step_train(check, sizes, records, "compile", sizes.gpus_one, (*fast, "--compile", *sizes.short_run),
                   limit=200, need=120 if not args.dry_run else None,
                   env={"TORCHDYNAMO_DISABLE": "1"} if args.dry_run else None,
                   note="dry run: TORCHDYNAMO_DISABLE=1 (eager)" if args.dry_run else "")
        fp16 = ("--amp", "fp16") + (() if args.dry_run else ("--channels-last",))
        step_train(check, sizes, records, "fp16", sizes.gpus_one, fp16)
        # DALI on the CPU threads, uint8 crops finished on the GPU: 300 steps give a steady rate
        step_train(check, sizes, records, "cpu loader", sizes.gpus_one,
                   ("--loader-device", "cpu", *fast, *sizes.short_run), need=60)
        if sizes.gpus_two:
            step_train(check, sizes, records, "two GPUs", sizes.gpus_two, fast)
        elif not args.dry_run:
            check.skip("train two GPUs", "only one GPU visible")
    return 1 if any(s.status in ("failed", "timeout") for s in check.steps) else 0


# ----------------------------------------------------------------------------- report

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
                    "----- stdout", _tail(check.work / "logs" / f"{i:02d}.out", LOG_TAIL),
                    "----- stderr", _tail(check.work / "logs" / f"{i:02d}.err", LOG_TAIL)]
    write_text(check.report / REPORT_FILES[2], "\n".join(log) + "\n")
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help=f"folder for {', '.join(REPORT_FILES)} (created; nothing else goes there)")
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes: checks the script itself")
    parser.add_argument("--no-install", action="store_true",
                        help="never pip-install (without a package registry nothing is installed anyway)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all steps (default: 360, dry run 240); steps that no longer fit are skipped")
    parser.add_argument("--work", default=None,
                        help="scratch folder for records, run folders and logs, outside REPORT "
                             "(default: $TMPDIR/gpu_check, else /tmp/gpu_check)")
    args = parser.parse_args(argv)
    report_dir = Path(args.report).resolve()
    work = Path(args.work or Path(tempfile.gettempdir()) / "gpu_check").resolve()
    if work == report_dir or report_dir in work.parents:
        print(f"error: {args.work}: the scratch folder must be outside the report folder", file=sys.stderr)
        return 2
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / "logs", ignore_errors=True)
    except OSError as exc:
        print(f"error: {exc.filename or args.report}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    budget = args.budget or (240.0 if args.dry_run else 360.0)
    check = Check(report_dir, work, budget, args.dry_run)
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, check.on_signal) for sig in handled}
    status = 1
    try:
        status = run_all(check, args)
        check.finished = True
    except Stopped as stop:
        status = 128 + stop.signum
    except Exception:  # a bug in the check itself: the report still holds what ran
        check.error = traceback.format_exc()
        print(f"error: the check itself failed: {check.error.strip().splitlines()[-1]}", file=sys.stderr)
    finally:
        check._writing = True       # a second signal now must not cut the last report short
        try:
            markdown = write_report(check)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print(markdown)
    return status


if __name__ == "__main__":
    sys.exit(main())
