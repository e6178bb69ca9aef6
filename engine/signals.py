"""SIGINT/SIGTERM: finish the current step, save, exit with a message on how to resume.

The first signal only sets a flag the training loop checks after every step; a second
SIGINT (an impatient Ctrl-C) raises KeyboardInterrupt at once, losing at most the work
since the last checkpoint, which stays intact (checkpoints are written atomically).
"""
from __future__ import annotations

import signal


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

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
