"""The shared foundation: atomic writes, the typed config (unknown keys rejected), the one
user-error base, the one integer check, device parsing and the one timing harness."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.atomic import append_line, atomic_open, write_json
from common.config import ConfigError, at_least, check_at_least, from_dict, parse_args, to_dict
from common.errors import DeviceError, UserError, error_line
from common.system import versions
from common.timing import Sample, interleaved, timed


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
        check_at_least(self, ["workers"])


def test_config_round_trip_and_unknown_keys():
    cfg = parse_args(_Cfg, ["--workers", "3", "--fast"])
    assert cfg == _Cfg(workers=3, out=None, fast=True)
    assert from_dict(_Cfg, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="wrokers"):
        from_dict(_Cfg, {"wrokers": 3})


@pytest.mark.parametrize("argv,says", [(["--workers", "0"], "--workers must be an integer >= 1, got 0"),
                                       (["--workers", "two"], "--workers"),
                                       (["--nope"], "unrecognized arguments: --nope")])
def test_config_bad_values_exit_2_with_one_line(capsys, argv, says):
    with pytest.raises(SystemExit) as err:
        parse_args(_Cfg, argv)
    assert err.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and says in last


# ---------------------------------------------------------------- one home each

@pytest.mark.parametrize("value,ok", [(1, True), (7, True), (0, False), (-3, False), (True, False),
                                      (2.0, False), ("2", False), (None, False)])
def test_at_least_takes_integers_only(value, ok):
    if ok:
        at_least("--batch-size", value)
        return
    with pytest.raises(ConfigError) as err:
        at_least("--batch-size", value)
    assert str(err.value) == f"--batch-size must be an integer >= 1, got {value!r}"


def test_check_at_least_names_the_flag_and_skips_none():
    @dataclass(frozen=True)
    class C:
        warmup_steps: int = 0
        max_steps: int | None = None
    check_at_least(C(), ["warmup_steps", "max_steps"], minimum=0)
    with pytest.raises(ConfigError, match=r"^--warmup-steps must be an integer >= 0, got -1$"):
        check_at_least(C(warmup_steps=-1), ["warmup_steps"], minimum=0)


def test_every_one_line_error_is_a_user_error():
    """Entry points catch UserError: every class whose message is a user's one line must be one."""
    from bench.loaders import BenchError
    from engine.checkpoint import CheckpointError
    from engine.distributed import DeviceError as EngineDeviceError
    from engine.session import RunError
    from pipeline.errors import LoaderError
    from records.format import RecordsError
    from tools.ablate import AblateError
    from tools.ablate_report import ReportError
    from tools.export import ExportError
    from tools.figures import FiguresError
    from tools.predict import PredictError
    from tools.weights import WeightsError
    for cls in (CheckpointError, EngineDeviceError, ExportError, FiguresError, PredictError, RunError,
                WeightsError, BenchError, LoaderError, RecordsError, ConfigError, DeviceError, AblateError, ReportError):
        assert issubclass(cls, UserError), cls
    assert EngineDeviceError is DeviceError
    # the ValueError ones stay ValueErrors (dataclass validation raises ValueError)
    assert issubclass(ConfigError, ValueError) and issubclass(LoaderError, ValueError)


def test_error_line_names_the_file_of_an_os_error(tmp_path):
    try:
        open(tmp_path / "nope.json")
    except OSError as exc:
        assert error_line(exc) == f"{tmp_path / 'nope.json'}: No such file or directory"
    assert error_line(UserError("x.json: bad")) == "x.json: bad"


def test_parse_device():
    import torch
    from common.devices import parse_device, sync
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="is not a device"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
            parse_device("cuda:0")
    else:
        count = torch.cuda.device_count()
        assert parse_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(DeviceError, match=f"{count} GPU"):
            parse_device(f"cuda:{count}")
    sync(["cpu", torch.device("cpu")])          # the CPU: nothing to wait for


def test_versions():
    v = versions(("pytest", "no-such-distribution-here", "nvidia-dali*"))
    assert v["pytest"] == pytest.__version__ and v["no-such-distribution-here"] is None
    assert v["python"].count(".") == 2
    assert any(name.startswith("nvidia-dali") and v[name] for name in v)   # the installed build


def test_sample_arithmetic():
    s = Sample(items=128, wall=0.5, cpu=0.064)
    assert s.rate == 256.0 and s.cpu_ms_per_item == 0.5


def test_interleaved_order_prepare_and_counts():
    calls = []

    def run(name, items):
        def go():
            calls.append(name)
            return items
        return go

    samples = interleaved({"a": run("a", 3), "b": run("b", 5), "c": run("c", 7)}, repeats=3,
                          prepare=lambda name: calls.append("prep " + name), alternate=True)
    assert calls == ["prep a", "a", "prep b", "b", "prep c", "c",
                     "prep c", "c", "prep b", "b", "prep a", "a",
                     "prep a", "a", "prep b", "b", "prep c", "c"]
    assert [s.items for s in samples["b"]] == [5, 5, 5] and list(samples) == ["a", "b", "c"]
    assert all(s.wall > 0 for runs in samples.values() for s in runs)


def test_timed_clocks():
    """Wall: a sleep is wall time but (almost) no CPU; CPU: a busy loop is CPU time, and so is
    the work of a child process reaped inside the span."""
    import subprocess
    import sys
    import time
    # in a fresh process: threads an earlier test left behind (a loader's prefetch) would bill
    # their CPU to this one's sleep
    out = subprocess.run([sys.executable, "-c", "import time\nfrom common.timing import timed\n"
                          "s = timed(lambda: (time.sleep(0.2), 1)[1])\nprint(s.wall, s.cpu)"],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True)
    wall, cpu = map(float, out.stdout.split())
    assert 0.19 < wall < 2 and cpu < 0.05

    def busy():
        end = time.process_time() + 0.2
        while time.process_time() < end:
            pass
        return 1
    assert timed(busy).cpu >= 0.19

    def child():
        subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                        "while time.process_time() < end: pass"], check=True)
        return 1
    assert timed(child).cpu >= 0.29


def test_a_positional_field_is_an_operand_not_a_flag(capsys):
    @dataclass(frozen=True)
    class Check:
        records: str = field(metadata={"help": "records folder", "positional": True})
        workers: int | None = None

    assert parse_args(Check, ["data/records", "--workers", "2"]) == Check("data/records", 2)
    with pytest.raises(SystemExit) as exit_:
        parse_args(Check, ["--records", "data/records"], prog="check")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("check: error: ")


def test_atomic_write_errors_name_the_target_not_the_temp_file(tmp_path, refuse_new_files):
    """The user asked for FILE: a read-only folder or a folder in FILE's place is reported
    as FILE, never as the hidden .FILE.*.tmp beside it (which does not exist afterwards)."""
    from common.atomic import write_bytes, write_unsynced
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_new_files(ro)
    for write in (write_bytes, write_unsynced):
        with pytest.raises(PermissionError) as caught:
            write(ro / "alexnet.pt", b"weights")
        assert error_line(caught.value) == f"{ro / 'alexnet.pt'}: Permission denied"
    ro.chmod(0o755)
    (tmp_path / "taken" / "inside").mkdir(parents=True)          # a folder where the file should go
    with pytest.raises(OSError) as caught:
        write_bytes(tmp_path / "taken", b"weights")
    assert error_line(caught.value).startswith(f"{tmp_path / 'taken'}: ")
    assert sorted(os.listdir(tmp_path)) == ["ro", "taken"] and os.listdir(ro) == []
