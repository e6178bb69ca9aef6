"""The shared foundation: atomic writes and the typed config (unknown keys rejected)."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import pytest

from common.atomic import append_line, atomic_open, write_json
from common.config import ConfigError, from_dict, parse_args, to_dict


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    path = tmp_path / "out" / "meta.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask   # not mkstemp's 0600
    assert os.listdir(path.parent) == ["meta.json"]              # no temp file left


def test_atomic_write_error_keeps_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as fh:
            fh.write("half of a new file")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["stats.json"]


def test_append_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"epoch": 1}')
    append_line(path, '{"epoch": 2}\n')
    assert path.read_text().splitlines() == ['{"epoch": 1}', '{"epoch": 2}']


@dataclass(frozen=True)
class _Cfg:
    workers: int = field(default=2, metadata={"help": "processes"})
    out: str | None = field(default=None, metadata={"help": "folder"})
    fast: bool = field(default=False, metadata={"help": "go fast"})

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")


def test_config_round_trip_and_unknown_keys():
    cfg = parse_args(_Cfg, ["--workers", "3", "--fast"])
    assert cfg == _Cfg(workers=3, out=None, fast=True)
    assert from_dict(_Cfg, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="wrokers"):
        from_dict(_Cfg, {"wrokers": 3})


@pytest.mark.parametrize("argv,says", [(["--workers", "0"], "--workers must be >= 1"),
                                       (["--workers", "two"], "--workers"),
                                       (["--nope"], "unrecognized arguments: --nope")])
def test_config_bad_values_exit_2_with_one_line(capsys, argv, says):
    with pytest.raises(SystemExit) as err:
        parse_args(_Cfg, argv)
    assert err.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and says in last
