"""The `mudd` command: `--help` imports neither torch nor transformers, every option has help text and a default."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_muddpythia import cli

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["main", "eval", "train-tiny", "write-tasks", "demo", "serve"]


def imported_modules(command: list[str]) -> set[str]:
    """Top-level modules a command imports, read from `python -X importtime` (an independent record)."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: mudd" in result.stdout
    lines = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert lines, "no import-time records"
    return {name.split(".")[0] for name in lines}


@pytest.mark.parametrize("args", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_of_python_m_imports_neither_torch_nor_transformers(args):
    modules = imported_modules([sys.executable, "-m", "modeling_muddpythia.cli", *args])
    assert "argparse" in modules  # the record works
    assert not modules & {"torch", "transformers", "lm_eval", "numpy"}, sorted(modules & {"torch", "transformers"})


def test_help_of_the_console_script_imports_neither_torch_nor_transformers():
    script = Path(sys.executable).parent / "mudd"
    if not script.is_file():
        pytest.skip("the `mudd` console script is not installed beside this interpreter")
    modules = imported_modules([str(script), "--help"])
    assert not modules & {"torch", "transformers"}


def test_every_option_has_help_text_and_shows_its_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(COMMANDS)
    for name, command in subparsers.choices.items():
        text = "".join(command.format_help().split())  # argparse wraps lines, also inside paths at "-"
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"mudd {name} {action.dest}: no help text"
            # a help text may state its default in its own words ("default: all"), but must then say "default:"
            if action.option_strings and action.default is not None and "default:" not in action.help:
                shown = "".join(f"(default: {action.default})".split())
                assert shown in text, f"mudd {name} {action.option_strings[0]}: default not shown"


def test_a_command_registers_the_models_after_parsing(tmp_path):
    """`mudd write-tasks` in a fresh process: arguments parsed first, then the package loads; output = shipped data."""
    result = subprocess.run([sys.executable, "-m", "modeling_muddpythia.cli", "write-tasks", "--output", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written
    for name in written:
        assert (tmp_path / name).read_bytes() == (REPO / "tests" / "tasks" / "data" / name).read_bytes(), name


def test_bad_arguments_fail_before_any_heavy_import():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "modeling_muddpythia.cli", "main", "--shots", "x"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "invalid int value" in result.stderr
    assert "| torch" not in result.stderr and "| transformers" not in result.stderr
