"""The README and the guides in docs/ promise links and commands that work.

Every relative link (and its #anchor) in README.md, BENCHMARKS.md and docs/*.md must reach a file
and a heading that exist, and every module (`python -m X`) or file (`python X.py`, `scripts/x.sh`)
they tell the user to run must be in the tree: a guide that names a moved or renamed command is
the first thing a new user trips on. The README stays a front page (under 15k characters) and its
Quick start is exactly the two commands CI runs the second of.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
COMMENT = re.compile(r"<!--.*?-->", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
MODULE = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
SCRIPT = re.compile(r"\bpython3?\s+((?:[\w-]+/)*[\w-]+\.py)\b")
PATHLIKE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)+[\w-]+\.(?:py|sh))\b")


def prose(text: str) -> str:
    """The page without code blocks and HTML comments (links there are not rendered)."""
    return FENCE.sub("", COMMENT.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    out = []
    for ch in text:
        if ch == " ":
            out.append("-")
        elif ch in "-_" or unicodedata.category(ch)[0] in "LN":
            out.append(ch)
    return "".join(out)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, title in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_slug_matches_github():
    # independent examples, worked by hand from GitHub's rendering rules
    assert slug("Model: the paper's two-tower AlexNet (`model/`)") == "model-the-papers-two-tower-alexnet-model"
    assert slug("uint8 views and `pipeline.finish`") == "uint8-views-and-pipelinefinish"
    assert slug("1. The loader alone") == "1-the-loader-alone"


def test_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "BENCHMARKS.md", "docs/design.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def _local_packages() -> set[str]:
    return {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_commands_exist(page):
    text = COMMENT.sub("", page.read_text(encoding="utf-8"))
    local = _local_packages()
    bad = []
    for mod in MODULE.findall(text):
        mod = mod.rstrip(".")
        if mod.split(".")[0] not in local:
            continue  # pytest, pip, torch.distributed...: not ours
        base = ROOT / mod.replace(".", "/")
        if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
            bad.append(f"python -m {mod}")
    for path in set(SCRIPT.findall(text)) | set(PATHLIKE.findall(text)):
        if not (ROOT / path).exists():
            bad.append(path)
    assert not bad, f"{page.name} names what is not in the tree: " + ", ".join(sorted(set(bad)))


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```\n(.*?)^```", section, re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme) < 15_000, f"README.md is {len(readme)} characters: move reference text into docs/"
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci, ".ci/run must run the README's test command"
