"""The GPU check: everything a machine with a GPU should measure, in one run of a few minutes.

    python scripts/gpu_check.py REPORT_DIR                 # installs what is missing, then runs
    python scripts/gpu_check.py REPORT_DIR --no-install    # a machine without internet
    python scripts/gpu_check.py REPORT_DIR --dry-run       # no CUDA needed: CPU, tiny sizes

Steps, in order, each a subprocess with its own time limit (a failing step is recorded and the
next one still runs; a step that no longer fits the --budget is skipped and says so):
install, environment, a sample record set (built small, its train shards repeated to ~64k
images so epochs are long enough to be steady state), the loader bench (dali, dali-u8, torch,
decode on cuda:0), the model bench (fp32; bf16 + channels_last; fp16 + channels_last), a
>= 1,000-step ``train.py --profile`` on one GPU (bf16 + channels_last, DALI on the GPU) and,
where two exist, on ``--gpus 0,1``; the same with ``--amp fp16``; a shorter one with
``--loader-device cpu`` (DALI on the CPU, uint8 batches finished on the GPU) when the budget
allows; and last the ``gpu``-marked tests (the measurements are the scarce part of a GPU
session; the tests get what is left of the budget).

Writes REPORT_DIR/gpu_check.json (every step: command, exit status, seconds, output tail, the
parsed results) and REPORT_DIR/gpu_check.md (the summary). Exit status: 0 when every step that
ran passed, 1 when one failed, 2 for bad arguments. Large files (data, run folders, traces)
stay in --work.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # run as a file: import the project from this checkout
    sys.path.insert(0, str(ROOT))

from common.atomic import write_json, write_text  # noqa: E402
from common.config import Parser  # noqa: E402

# module -> what pip installs for it. torch and DALI are installed only when missing and never
# upgraded: a GPU machine's own CUDA build of torch must not be swapped for the pinned CPU one
# (which is why this does not pip-install the project with its pins).
NEEDED = {"torch": "torch", "nvidia.dali": "nvidia-dali-cuda120==2.4.0", "pytest": "pytest",
          "rich": "rich", "numpy": "numpy", "PIL": "pillow", "matplotlib": "matplotlib"}


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
                       gpus_one="", gpus_two=None,
                       # the light test modules only: collecting all of them costs ~20 s on 2 cores
                       test_paths=("tests/test_model.py", "tests/test_precision.py"))
        return cls(device="cuda:0", classes=10, per_class=160, repeat=40,   # 64,000 train images
                   loader_args=("--batch-size", "128", "--batches", "20", "--warmup", "5", "--repeats", "3"),
                   model_args=("--batch-size", "128", "--steps", "10", "--repeats", "3", "--warmup", "3"),
                   train_args=("--batch-size", "128", "--max-steps", "1000", "--epochs", "3"),
                   gpus_one="0", gpus_two="0,1" if gpu_count >= 2 else None, test_paths=("tests",))


@dataclass
class Step:
    name: str
    command: list[str]
    status: str = "pending"       # passed | failed | skipped | timeout
    returncode: int | None = None
    seconds: float = 0.0
    output_tail: str = ""
    note: str = ""
    results: dict = field(default_factory=dict)


class Check:
    """Runs the steps against a time budget and collects the report."""

    def __init__(self, report: Path, work: Path, budget: float, dry: bool):
        self.report, self.work, self.budget, self.dry = report, work, budget, dry
        self.start = time.monotonic()
        self.steps: list[Step] = []
        self.env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, command: list[str], limit: float, need: float | None = None) -> Step:
        """Run ``command`` from the repository root for at most ``limit`` s (less if the budget
        is running out); skipped when less than ``need`` s (default: a third of limit) is left."""
        step = Step(name, [str(c) for c in command])
        self.steps.append(step)
        need = limit / 3 if need is None else need
        if self.left() < need:
            step.status, step.note = "skipped", f"budget: {self.left():.0f} s left, needs ~{need:.0f} s"
            return step
        began = time.monotonic()
        try:
            done = subprocess.run(step.command, cwd=ROOT, capture_output=True, text=True,
                                  timeout=max(1.0, min(limit, self.left())),
                                  env={**os.environ, **self.env})
            step.returncode = done.returncode
            step.status = "passed" if done.returncode == 0 else "failed"
            out = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            step.status = "timeout"
            out = _text(exc.stdout) + _text(exc.stderr)
        except OSError as exc:
            step.status, out = "failed", f"{type(exc).__name__}: {exc}"
        step.seconds = round(time.monotonic() - began, 1)
        step.output_tail = out[-4000:]
        return step

    def skip(self, name: str, note: str) -> None:
        self.steps.append(Step(name, [], status="skipped", note=note))


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- steps

def missing_modules() -> list[str]:
    missing = []
    for module in NEEDED:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:      # a dotted name whose parent is missing
            found = False
        if not found:
            missing.append(module)
    return missing


def step_install(check: Check, no_install: bool) -> None:
    missing = missing_modules()
    if not missing:
        check.skip("install", "everything needed is importable")
    elif no_install:
        check.skip("install", f"--no-install: missing {', '.join(missing)}; later steps may fail")
    else:
        check.run("install", [sys.executable, "-m", "pip", "install", "-q", *(NEEDED[m] for m in missing)], 240)


def step_environment(check: Check) -> dict:
    probe = ("import json, torch; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'gpus': [torch.cuda.get_device_name(i) "
             "for i in range(torch.cuda.device_count())]}))")
    step = check.run("environment", [sys.executable, "-c", probe], 60, need=0)
    try:
        info = json.loads(step.output_tail.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {"gpus": []}
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = done.stdout.strip()
    step.results = info
    return info


def step_records(check: Check, sizes: Sizes) -> Path | None:
    """A sample set built small, then its train shards listed ``repeat`` times (symlinks)."""
    src, rec, big = check.work / "src", check.work / "records", check.work / "records-repeated"
    for path in (src, rec, big):
        shutil.rmtree(path, ignore_errors=True)
    step = check.run("sample set", [sys.executable, "-m", "prep.sample", src, "--classes", sizes.classes,
                                    "--train-per-class", sizes.per_class, "--val-per-class", 10], 150)
    if step.status != "passed":
        return None
    step = check.run("records", [sys.executable, "prep/build_records.py", "--source", src, "--out", rec,
                                 "--no-progress"], 150)
    if step.status != "passed":
        return None
    repeat_shards(rec, big, sizes.repeat)
    step.results = {"train_images": json.loads((big / "meta.json").read_text())["counts"]["train"],
                    "repeat": sizes.repeat, "folder": str(big)}
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
    out = check.report / "loader_bench.json"
    step = check.run("loader bench", [sys.executable, "-m", "bench.loaders", "--records", records,
                                      "--loaders", "dali,dali-u8,torch,decode", "--device", sizes.device,
                                      *sizes.loader_args, "--no-progress", "--json", out], 150)
    loaders = _load_json(out).get("loaders", {})
    step.results = {n: {k: e.get(k) for k in ("images_per_s", "vs_decode", "finish_images_per_s") if k in e}
                    for n, e in loaders.items()}


MODEL_CONFIGS = (("fp32", ()), ("bf16 channels_last", ("--amp", "bf16", "--channels-last")),
                 ("fp16 channels_last", ("--amp", "fp16", "--channels-last")))


def step_model_bench(check: Check, sizes: Sizes) -> None:
    for label, args in MODEL_CONFIGS:
        out = check.report / f"model_bench_{label.split()[0]}.json"
        step = check.run(f"model bench {label}", [sys.executable, "-m", "bench.model", "--device", sizes.device,
                                                  *args, *sizes.model_args, "--no-progress", "--json", out], 90)
        step.results = _load_json(out).get("median_images_per_s", {})


def step_train(check: Check, sizes: Sizes, records: Path, label: str, gpus: str, flags: tuple[str, ...],
               need: float | None = None) -> None:
    """One ``train.py --profile`` run; ``flags`` come after the sizes, so they may override them."""
    run_dir = check.work / "runs" / label.replace(" ", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    step = check.run(f"train {label}", [sys.executable, "train.py", "--records", records, "--gpus", gpus,
                                        *sizes.train_args, *flags, "--profile", "--no-final-eval",
                                        "--no-progress", "--out", run_dir], 200, need=need)
    profile = _load_json(run_dir / "profile.json")
    if profile:
        shutil.copy(run_dir / "profile.json", check.report / f"profile_{label.replace(' ', '_')}.json")
    step.results = {k: profile.get(k) for k in ("steps", "images_per_s", "data_stall_percent", "step_ms")
                    if k in profile}


# ----------------------------------------------------------------------------- report

def render_markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "",
             f"- mode: {'dry run (CPU, tiny sizes)' if report['dry_run'] else 'GPU'}",
             f"- GPUs: {', '.join(report['environment'].get('gpus') or []) or 'none'}",
             f"- torch {report['environment'].get('torch')}, CUDA {report['environment'].get('cuda')}",
             f"- total: {report['seconds']:.0f} s of a {report['budget']:.0f} s budget", "",
             "| step | status | s | results |", "|---|---|---:|---|"]
    for s in report["steps"]:
        res = "; ".join(f"{k}: {_fmt(v)}" for k, v in s["results"].items()) or s["note"]
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {res} |")
    failed = [s for s in report["steps"] if s["status"] in ("failed", "timeout")]
    for s in failed:
        lines += ["", f"## {s['name']}: {s['status']}", "", "```", s["output_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="folder for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes: checks the script itself")
    parser.add_argument("--no-install", action="store_true", help="never pip-install (no internet)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all steps (default: 450, dry run 240); steps that no longer fit are skipped")
    parser.add_argument("--work", default=None, help="scratch folder for data and run folders (default: REPORT/work)")
    args = parser.parse_args(argv)
    report_dir = Path(args.report)
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        work = Path(args.work) if args.work else report_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: {args.report}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    budget = args.budget or (240.0 if args.dry_run else 450.0)
    check = Check(report_dir.resolve(), work.resolve(), budget, args.dry_run)

    step_install(check, args.no_install)
    env = step_environment(check)
    gpu_count = len(env.get("gpus") or [])
    if not args.dry_run and gpu_count == 0:
        write_report(check, env)
        print("error: no CUDA GPU visible to torch; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    sizes = Sizes.for_run(args.dry_run, gpu_count)
    records = step_records(check, sizes)
    if records is None:
        check.skip("loader bench", "no records")
    else:
        step_loader_bench(check, sizes, records)
    step_model_bench(check, sizes)
    if records is None:
        check.skip("train", "no records")
    else:
        bf16 = () if args.dry_run else ("--amp", "bf16", "--channels-last")
        step_train(check, sizes, records, "one GPU bf16" if not args.dry_run else "cpu", sizes.gpus_one, bf16)
        if sizes.gpus_two:
            step_train(check, sizes, records, "two GPUs bf16", sizes.gpus_two, bf16)
        elif not args.dry_run:
            check.skip("train two GPUs bf16", "only one GPU visible")
        fp16 = ("--amp", "fp16") + (() if args.dry_run else ("--channels-last",))
        step_train(check, sizes, records, "one GPU fp16" if not args.dry_run else "cpu fp16", sizes.gpus_one, fp16)
        # DALI on the CPU threads, uint8 crops finished on the GPU: 300 steps are enough for a
        # steady rate, and the run is skipped rather than squeezing the gpu tests out
        cpu_loader = ("--loader-device", "cpu") + (() if args.dry_run else ("--amp", "bf16", "--channels-last",
                                                                            "--max-steps", "300"))
        step_train(check, sizes, records, "one GPU bf16 cpu-loader" if not args.dry_run else "cpu u8-loader",
                   sizes.gpus_one, cpu_loader, need=60)
    # a module that cannot be imported here (FFCV missing) must not hide the other GPU tests
    check.run("gpu tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            "--continue-on-collection-errors", *sizes.test_paths], 180, need=30)
    markdown = write_report(check, env)
    print(markdown)
    return 1 if any(s.status in ("failed", "timeout") for s in check.steps) else 0


def write_report(check: Check, env: dict) -> str:
    """gpu_check.json and gpu_check.md into the report folder (atomically); returns the Markdown."""
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": check.dry, "budget": check.budget, "seconds": round(time.monotonic() - check.start, 1),
              "environment": env, "steps": [asdict(s) for s in check.steps]}
    write_json(check.report / "gpu_check.json", report)
    markdown = render_markdown(report)
    write_text(check.report / "gpu_check.md", markdown)
    return markdown


if __name__ == "__main__":
    sys.exit(main())
