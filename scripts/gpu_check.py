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

Beside it in scripts/: gpu_runner.py runs a step (``Check``), gpu_report.py writes the report.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # run as a file: import the project from this checkout
    sys.path.insert(0, str(ROOT))

from common.config import Parser  # noqa: E402

# siblings in scripts/: sys.path[0] when run as a file
from gpu_report import REPORT_FILES, Step, write_report  # noqa: E402
from gpu_runner import Check, Stopped  # noqa: E402

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
                       train_args=("--batch-size", "4", "--max-steps", "3", "--epochs", "1", "--workers", "1",
                                   "--profile-warmup", "1", "--profile-window", "1"),
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
