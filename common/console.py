"""The rich Console every command prints through, with a width that suits logs.

In a terminal rich follows the terminal's width. Anywhere else (nohup, SLURM, CI, a pipe, a
file) rich assumes 80 columns and breaks table headers and titles mid-phrase; there the
width is 100 columns, or $COLUMNS when it is set (rich reads it itself).
"""
from __future__ import annotations

import os

from rich.console import Console

NON_TERMINAL_WIDTH = 100       # columns, when stdout is not a terminal and $COLUMNS is unset


def make_console(**kwargs) -> Console:
    """A rich Console (``kwargs`` as for Console), 100 columns wide when not a terminal."""
    console = Console(**kwargs)
    if not console.is_terminal and "width" not in kwargs and not os.environ.get("COLUMNS", "").isdigit():
        console.width = NON_TERMINAL_WIDTH
    return console


def counted(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless n is 1: "1 bad record", "0 bad shards"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """``text`` safe to print as part of one line: every control character (Unicode category Cc:
    newline, tab, escape, bell...) written as its escape (``\\n``, ``\\t``, ``\\x1b``), other
    characters (accents, non-Latin scripts) kept. Line-oriented output (predict.py's) stays one
    record a line whatever a class name or file name holds."""
    import unicodedata
    if all(unicodedata.category(c) != "Cc" for c in text):
        return text
    return "".join(_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c)
                   for c in text)
