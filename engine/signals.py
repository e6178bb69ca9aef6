"""SIGINT/SIGTERM: finish the current step (or validation batch), save, exit with a message on
how to resume.

The first signal only sets a flag (and says so on stderr) that the training loop checks after
every step and validation after every batch; a second SIGINT (an impatient Ctrl-C) raises
KeyboardInterrupt at once, losing at most the work since the last checkpoint, which stays
intact (checkpoints are written atomically).
"""
from __future__ import annotations

import signal
import sys

from common.errors import UserError


class Interrupted(UserError):
    """A signal met during an evaluation: raised from the evaluation loop, so a validation of
    minutes never holds a stop (a scheduler's grace period is often ~30 s). A UserError, so a
    rank that met it stops every rank together (``engine.distributed.fail_together``)."""


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            again = "; Ctrl-C again to stop at once, losing the work since the last checkpoint" \
                if signum == signal.SIGINT else ""
            print(f"train: {signal.Signals(signum).name} received: saving after this step or batch{again}",
                  file=sys.stderr, flush=True)
        self.signum = signum

    def check(self) -> None:
        """Raise Interrupted if a signal came (for evaluation loops)."""
        if self.signum is not None:
            raise Interrupted(f"{self.name} received")

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell's convention for 'ended by this signal'."""
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
