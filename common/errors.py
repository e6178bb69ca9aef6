"""The one base class of the errors a user can fix: bad input or an OS problem.

Every such error's message is one line that names the file or flag and what is wrong;
entry points catch ``UserError`` (and ``OSError``), print ``error: MESSAGE`` to stderr and
exit with status 2. Anything else is a bug and keeps its traceback.

    from common.cli import run_command
    return run_command(lambda: run(cfg))     # UserError/OSError -> "error: ..." on stderr, exit 2
"""
from __future__ import annotations

import contextlib
from pathlib import Path


class UserError(Exception):
    """Bad input or an OS problem; the message is one line naming the file or flag."""


class DeviceError(UserError, ValueError):
    """A device that is not there or not supported (--device, --gpus); one line."""


def error_line(exc: BaseException) -> str:
    """The one line to print after ``error:``: an OSError as ``PATH: reason``, others as is."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


@contextlib.contextmanager
def naming(path: str | Path):
    """An OSError raised inside without a file name (a full disk in write() or fsync(), which
    name none) is raised again naming ``path``, so ``error_line`` can say which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None
