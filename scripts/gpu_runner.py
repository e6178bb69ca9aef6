"""The GPU check's runner: each step a subprocess in its own process group, from the checkout, with
its own time limit against the check's budget, the report rewritten around it and a signal
turned into ``Stopped``. scripts/gpu_check.py has the details."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from gpu_report import Step, tail, write_report

ROOT = Path(__file__).resolve().parent.parent   # the checkout: the steps run from it, first on their PYTHONPATH


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
            step.output_tail = (tail(out_path, 3000) + "\n" + tail(err_path, 3000)).strip()
            if step.status != "stopped":
                self.save()
        return step

    def stdout(self, step: Step) -> str:
        return tail(self.work / "logs" / f"{self.steps.index(step) + 1:02d}.out", 1_000_000)

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
