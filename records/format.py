"""The records folder's names and constants, its one error class, and the build command that
repairs it (the wording every reader's hint uses)."""
from __future__ import annotations

import shlex
from pathlib import Path

from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECORDS = REPO_ROOT / "data" / "records"
DEFAULT_SAMPLE = REPO_ROOT / "data" / "sample"
FORMAT = "dali-alexnet-records/1"
SPLITS = ("train", "val")
INDEX_VERSION = "v1.2"       # the first token of a DALI webdataset index (wds2idx, nvidia-dali 2.4)
TAR_BLOCK = 512              # bytes: a ustar header, and the unit every member starts on


class RecordsError(UserError):
    """The records folder is missing or malformed; the message is one line naming the file."""


def build_command(out: str, source: str, params: dict, *extra: str) -> str:
    """The build_records command that reproduces the build meta.json describes (``source`` and
    ``params`` as it holds them), plus ``extra`` flags: what a user types to repair or extend it."""
    flags = [f"--source {shlex.quote(source)}", f"--out {shlex.quote(out)}", f"--shard-size {params['shard_size']}",
             f"--quality {params['quality']}", f"--seed {params['seed']}"]
    if params.get("val_labels"):
        flags.append(f"--val-labels {shlex.quote(params['val_labels'])}")
    if params.get("val_fraction"):
        flags.append(f"--val-fraction {params['val_fraction']}")
    return " ".join(["python prep/build_records.py", *flags, *extra])
