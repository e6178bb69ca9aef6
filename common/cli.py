"""The one ending of every entry point: a user's error is one line and exit status 2.

    from common.cli import run_command
    def main(argv=None) -> int:
        cfg = parse_args(Config, argv, prog="python -m x")     # bad flags: argparse's one line, exit 2
        return run_command(lambda: work(cfg))

``run_command`` runs the command's work: a ``UserError`` or ``OSError`` (bad input, a full disk,
a missing file) becomes ``error: MESSAGE`` on stderr (``common.errors.error_line``) and exit
status 2; anything else is a bug and keeps its traceback. Where the command says what Ctrl-C
leaves behind (``interrupted``), a KeyboardInterrupt prints that line instead of a traceback
and exits 130 (128 + SIGINT, the shell's convention).
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

from common.errors import UserError, error_line

USER_ERROR = 2                            # exit status: bad input or an OS problem (one line)
INTERRUPTED = 128 + signal.SIGINT         # exit status: stopped with Ctrl-C


def run_command(work: Callable[[], int | None], interrupted: str | None = None,
                errors: tuple[type[BaseException], ...] = (UserError, OSError)) -> int:
    """``work()``'s exit status (None counts as 0); ``errors`` as one ``error:`` line and
    USER_ERROR; Ctrl-C as the ``interrupted`` line and INTERRUPTED where one is given."""
    try:
        status = work()
    except errors as exc:
        fail(error_line(exc))
        return USER_ERROR
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        return INTERRUPTED
    return 0 if status is None else status


def fail(message: str) -> int:
    """Print ``error: message`` to stderr; USER_ERROR, for ``return fail(...)``."""
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR
