"""The key -> source photo list of a split: OUT/<split>/keys.tsv, one line per record
(``key<TAB>shard<TAB>source path``, path relative to the build's source; tab, newline, carriage
return and backslash escaped), so verify, figures and neighbours can name the photo behind a
record. The builder writes it (prep/finish.py), readers take it from here."""
from __future__ import annotations

from pathlib import Path

from records.format import RecordsError

KEYS_FILE = "keys.tsv"    # OUT/<split>/keys.tsv: one line per record, ``key<TAB>shard<TAB>source path``
_TSV_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))


def tsv_escape(text: str) -> str:
    """A file name as one TSV field: backslash, tab, newline and carriage return escaped (\\ \\t \\n \\r)."""
    for raw, escaped in _TSV_ESCAPES:
        text = text.replace(raw, escaped)
    return text


def tsv_unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 1 < len(field):
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(field[i + 1], field[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_keys(out: str | Path, split: str) -> dict[str, tuple[str, str]]:
    """{key: (shard, source path relative to the build's source)} from OUT/<split>/keys.tsv;
    {} for records built before it was written. RecordsError for a malformed file."""
    path = Path(out) / split / KEYS_FILE
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{path}: unreadable ({exc})") from None
    keys = {}
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise RecordsError(f"{path}:{n}: expected 'key<TAB>shard<TAB>path'")
        keys[parts[0]] = (parts[1], tsv_unescape(parts[2]))
    return keys
