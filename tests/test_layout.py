"""The package layout the maintainers rely on: the training path loads no benchmark, no
after-training tool and not the records builder; the commands setup.cfg installs exist; every
entry point ends a user's error the same way (one line, exit status 2)."""
from __future__ import annotations

import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import INTERRUPTED, USER_ERROR, fail, run_command
from common.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
OFF_PATH = ("bench", "tools", "prep")


def loaded_after(code: str) -> list[str]:
    """The modules of bench/, tools/ and prep/ a fresh interpreter holds after ``code``."""
    probe = f"import sys\n{code}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {OFF_PATH!r}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_training_path_loads_no_bench_tool_or_builder():
    """Importing the engine (what train.py runs) loads none of them: the record format is read
    through records/, not the builder's package."""
    assert loaded_after("import engine.run") == []


def test_tensorboards_conv1_picture_needs_no_figure_tools():
    """The training log's conv1 picture is the same array tools.figures saves, drawn without it."""
    code = ("import numpy as np\nfrom engine.logs import conv1_image\nfrom model import AlexNet, AlexNetConfig\n"
            "grid = conv1_image(AlexNet(AlexNetConfig(num_classes=10)))\n"
            "assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3")
    assert loaded_after(code) == []


def test_installed_commands_name_existing_mains_and_packages_are_listed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = [line.split("=") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert {name.strip() for name, _ in scripts} >= {"alexnet-train", "alexnet-build-records", "alexnet-verify",
                                                     "alexnet-predict", "alexnet-figures", "alexnet-export"}
    for name, target in scripts:
        module, func = target.strip().split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    listed = set(cfg["options.packages.find"]["include"].split())
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages == {"common", "prep", "records", "pipeline", "model", "engine", "bench", "tools"}
    assert listed == packages | {f"{p}.*" for p in packages}


def test_run_command_ends_a_user_error_in_one_line_with_status_2(capsys):
    def bad_input():
        raise UserError("data/records/meta.json: missing")

    def os_failure():
        raise OSError(28, "No space left on device", "runs/x/last.pt")

    assert run_command(bad_input) == USER_ERROR == 2
    assert run_command(os_failure) == 2
    assert fail("--out: no such folder") == 2
    assert capsys.readouterr().err == ("error: data/records/meta.json: missing\n"
                                       "error: runs/x/last.pt: No space left on device\n"
                                       "error: --out: no such folder\n")
    assert run_command(lambda: 3) == 3 and run_command(lambda: None) == 0


def test_run_command_keeps_a_bugs_traceback_and_words_ctrl_c_only_where_asked(capsys):
    def bug():
        raise KeyError("not a user's error")

    def ctrl_c():
        raise KeyboardInterrupt

    with pytest.raises(KeyError):
        run_command(bug)
    with pytest.raises(KeyboardInterrupt):
        run_command(ctrl_c)
    assert run_command(ctrl_c, interrupted="interrupted: rerun to resume") == INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted: rerun to resume\n"
