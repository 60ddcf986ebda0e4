"""tools/install_torch.py (`make setup`): CPU wheel index first, a visible fallback to the plain pin, the build named."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "install_torch.py"


@pytest.fixture
def tool(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(module, "installed_build", lambda: "torch 9.9.9+cpu: CPU build")
    monkeypatch.setattr(module.sys, "prefix", str(tmp_path))
    module.calls = calls
    return module


def _pip(tool, results):
    def pip_install(*args):
        tool.calls.append(args)
        return results.pop(0)
    return pip_install


def test_reachable_index_is_used(tool, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tool, "index_reachable", lambda index, timeout: None)
    monkeypatch.setattr(tool, "pip_install", _pip(tool, [0]))
    assert tool.main(["--version", "2.13.0", "--index", "https://example.invalid/whl/cpu"]) == 0
    assert tool.calls == [("--index-url", "https://example.invalid/whl/cpu", "torch==2.13.0")]
    out, err = capsys.readouterr()
    assert "from https://example.invalid/whl/cpu" in out and "not usable" not in err
    assert (tmp_path / "torch-build.txt").read_text().startswith("torch 9.9.9+cpu: CPU build")


@pytest.mark.parametrize("reachable, pip_results", [(False, [0]), (True, [1, 0])])
def test_unusable_index_falls_back_to_the_plain_pin_and_says_so(tool, monkeypatch, capsys, reachable, pip_results):
    monkeypatch.setattr(tool, "index_reachable", lambda index, timeout: None if reachable else "no route")
    monkeypatch.setattr(tool, "pip_install", _pip(tool, list(pip_results)))
    assert tool.main(["--version", "2.13.0"]) == 0
    assert tool.calls[-1] == ("torch==2.13.0",)
    out, err = capsys.readouterr()
    assert "Falling back to the plain pin torch==2.13.0" in err and "CUDA" in err
    assert "pip's usual index" in out


def test_pypi_choice_installs_the_plain_pin_only(tool, monkeypatch, capsys):
    monkeypatch.setattr(tool, "index_reachable", lambda index, timeout: pytest.fail("no probe for --build pypi"))
    monkeypatch.setattr(tool, "pip_install", _pip(tool, [0]))
    assert tool.main(["--version", "2.13.0", "--build", "pypi"]) == 0
    assert tool.calls == [("torch==2.13.0",)]


def test_failed_install_fails(tool, monkeypatch):
    monkeypatch.setattr(tool, "index_reachable", lambda index, timeout: "no route")
    monkeypatch.setattr(tool, "pip_install", _pip(tool, [1]))
    assert tool.main(["--version", "2.13.0"]) == 1


def test_the_installed_build_is_named_from_package_metadata():
    spec = importlib.util.spec_from_file_location("install_torch_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    line = module.installed_build()
    assert line.startswith(f"torch {torch.__version__}: ")
    assert ("CPU build" in line) == (torch.version.cuda is None and torch.version.hip is None)
