"""scripts/gpu_check.sh rehearsed on a CPU under the lent GPU machine's conditions.

There, the interpreter's own path has torch but no DALI: DALI comes only through an extra
PYTHONPATH entry (the dali-kit's /tmp/site); no package registry answers; stderr carries
warnings; a step can fail; and the call can be stopped halfway. Here the same is built from this
venv: an interpreter whose site-packages list everything of the venv except ``nvidia`` (and the
project's editable install), a folder exposing the venv's ``nvidia`` package (DALI) put on
PYTHONPATH, pip pointed at a closed port, and a ``sitecustomize`` on PYTHONPATH that every
Python process of the check loads: it logs the process's command line and where ``nvidia.dali``
would be imported from, writes a warning to stderr, and fails one chosen step at start.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = r'''
import importlib.util, json, os, sys
_spec = importlib.util.find_spec("nvidia.dali") if importlib.util.find_spec("nvidia") else None
_line = {"pid": os.getpid(), "argv": sys.orig_argv,
         "dali": _spec.origin if _spec is not None else None}
_fd = os.open(os.environ["REHEARSAL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(_fd, (json.dumps(_line) + "\n").encode()); os.close(_fd)
print("UserWarning: a warning on stderr, as CUDA and DALI print them", file=sys.stderr)
if os.environ.get("REHEARSAL_FAIL") and os.environ["REHEARSAL_FAIL"] in " ".join(sys.orig_argv):
    print("rehearsal: this step is made to fail", file=sys.stderr)
    os._exit(7)
'''


@pytest.fixture(scope="module")
def device_like(tmp_path_factory):
    """(python, dali folder, probe folder): an interpreter that sees torch but not DALI."""
    base = tmp_path_factory.mktemp("rehearsal")
    site = Path(sysconfig.get_paths()["purelib"])
    farm = base / "farm"              # the venv's packages, less nvidia/ and the editable install
    farm.mkdir()
    for item in site.iterdir():
        low = item.name.lower()
        if low.startswith(("nvidia", "__editable__", "dali_alexnet", "sitecustomize")) or low.endswith(".pth"):
            continue
        (farm / item.name).symlink_to(item)
    venv = base / "py"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv],
                   check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(venv_site, "farm.pth").write_text(f"{farm}\n")
    dali = base / "dali-site"          # what the kit unpacks into /tmp/site
    dali.mkdir()
    (dali / "nvidia").symlink_to(site / "nvidia")
    probe = base / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # the premise: torch by default, DALI only through PYTHONPATH
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    seen = subprocess.run([python, "-c", "import importlib.util as u; import torch; "
                           "print(u.find_spec('nvidia') is None)"], env=bare, capture_output=True, text=True)
    assert seen.stdout.strip() == "True", seen.stderr
    return python, dali, probe


def _launch(device_like, tmp_path, extra_path: list[Path], fail: str = "", *args: str) -> tuple[subprocess.Popen, dict]:
    python, _, _ = device_like
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PYTHON=str(python), PYTHONPATH=os.pathsep.join(map(str, extra_path)),
               PIP_INDEX_URL="http://127.0.0.1:9/", PIP_NO_INDEX="1", PIP_FIND_LINKS="",
               TMPDIR=str(tmp_path), REHEARSAL_LOG=str(tmp_path / "processes.jsonl"), REHEARSAL_FAIL=fail)
    proc = subprocess.Popen(["bash", "scripts/gpu_check.sh", str(tmp_path / "report"), "--dry-run", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, env


def _processes(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "processes.jsonl").read_text().splitlines()]


def _is_pip(argv) -> bool:
    return any(Path(a).name in ("pip", "pip3") for a in argv)


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / "report" / "gpu_check.json").read_text())


def test_dry_run_on_a_device_like_python_runs_every_step_with_dali(device_like, tmp_path):
    """DALI only on PYTHONPATH, no registry, stderr noise, the gpu tests made to fail: every
    other step passes in the promised order, each step's process could import DALI from the
    extra path, nothing is installed, the report folder holds at most 6 files and no scratch."""
    _, dali, probe = device_like
    proc, _ = _launch(device_like, tmp_path, [probe, dali], "-m gpu", "--budget", "900")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-2000:]                      # one step failed
    report = _report(tmp_path)
    steps = {s["name"]: s for s in report["steps"]}
    order = [s["name"] for s in report["steps"]]
    assert order[:2] == ["environment", "gpu tests"], order
    first_model = min(i for i, n in enumerate(order) if n.startswith("model bench"))
    assert first_model < order.index("loader bench") < min(i for i, n in enumerate(order) if n.startswith("train"))
    assert steps["gpu tests"]["status"] == "failed" and "made to fail" in steps["gpu tests"]["output_tail"]
    bad = [(n, s["status"], s["note"], s["output_tail"][-300:]) for n, s in steps.items()
           if n != "gpu tests" and s["status"] != "passed"]
    assert not bad
    import torch
    env = steps["environment"]["results"]
    assert env["torch"] == torch.__version__ and env["dali"]            # parsed despite the warning
    assert Path(env["dali_from"]) == dali
    # every step's command was a process that found DALI under the extra PYTHONPATH entry
    started = {tuple(p["argv"]): p["dali"] for p in _processes(tmp_path)}
    for s in report["steps"]:
        if s["command"]:
            assert tuple(s["command"]) in started, s["name"]
            assert started[tuple(s["command"])].startswith(str(dali)), s["name"]
    assert not [p for p in started if _is_pip(p)]                      # nothing was installed
    # the numbers the old dry run checked
    assert steps["records"]["results"]["train_images"] == 4 * 12 * 2
    assert set(steps["loader bench"]["results"]) == {"dali", "dali-u8", "torch", "decode"}
    assert steps["loader bench"]["results"]["dali-u8"]["finish_images_per_s"] > 0
    assert steps["model bench fp16 channels_last"]["results"]["ours"] > 0
    trained = steps["train one device"]["results"]          # 1 warm-up, 1 end-to-end, 1 split step
    assert (trained["warmup_steps"], trained["steps"]) == (1, 1)
    assert trained["end_to_end_images_per_s"] > 0 and trained["model_images_per_s"] > 0
    assert "--amp fp16" in " ".join(steps["train fp16"]["command"])
    assert "--loader-device cpu" in " ".join(steps["train cpu loader"]["command"])
    assert "--compile" in steps["train compile"]["command"]
    files = list((tmp_path / "report").iterdir())
    assert len(files) <= 6 and all(f.is_file() for f in files), files
    assert (tmp_path / "gpu_check").is_dir()                          # scratch under TMPDIR
    markdown = (tmp_path / "report" / "gpu_check.md").read_text()
    assert "| loader bench | passed |" in markdown and "dry run" in markdown
    assert "## gpu tests: failed" in markdown


def test_sigterm_halfway_leaves_the_report_of_what_ran(device_like, tmp_path):
    """Without DALI and without a registry: one line names the dali-kit, nothing is installed;
    a SIGTERM during the model bench stops the check within seconds, leaves no process behind,
    and the report holds every step that finished, the one that was stopped, exit 128+15."""
    _, _, probe = device_like
    proc, _ = _launch(device_like, tmp_path, [probe], "", "--budget", "900")
    deadline = time.monotonic() + 60
    report = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            report = _report(tmp_path)
        except (OSError, ValueError):
            report = None
        if report and report["steps"][-1]["status"] == "running" and any(
                s["name"].startswith("model bench") and s["status"] == "passed" for s in report["steps"]):
            break                           # a step after the first model bench is running
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - stopped_at < 20
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    report = _report(tmp_path)
    steps = report["steps"]
    names = [s["name"] for s in steps]
    assert names[:2] == ["environment", "gpu tests"]
    env = steps[0]
    assert env["status"] == "passed" and "dali-kit" in env["note"] and "../shared/device/dali-kit" in err
    assert "dali-kit" in (tmp_path / "report" / "gpu_check.md").read_text()
    finished = [s for s in steps if s["status"] == "passed"]
    assert any(s["name"].startswith("model bench") and s["results"].get("ours", 0) > 0 for s in finished)
    assert [s["status"] for s in steps].count("stopped") == 1
    assert report["stopped"] == "SIGTERM"
    assert "stopped by SIGTERM" in (tmp_path / "report" / "gpu_check.md").read_text()
    processes = _processes(tmp_path)
    assert not [p for p in processes if _is_pip(p["argv"])]
    time.sleep(1)                           # orphans are reaped by init, not at once
    alive = []
    for p in processes:                     # the stopped step's process group is gone too
        try:
            os.kill(p["pid"], 0)
            alive.append(p["argv"])
        except ProcessLookupError:
            pass
    assert not alive
    assert len(list((tmp_path / "report").iterdir())) <= 6
