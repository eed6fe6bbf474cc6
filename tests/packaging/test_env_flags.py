"""One rule for every FASTBERT_* boolean (fastbert/env.py): 1/true/yes/on, 0/false/no/off/empty, anything else
an error naming the variable, its value and the spellings; setup.py follows it without importing torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastbert.env import FALSE, TRUE, flag, parse_flag

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", [*TRUE, "TRUE", " Yes ", "On\n"])
def test_true_spellings(value):
    assert parse_flag("FASTBERT_X", value) is True


@pytest.mark.parametrize("value", [*FALSE, "FALSE", " No ", "Off", "  "])
def test_false_spellings(value):
    assert parse_flag("FASTBERT_X", value) is False


@pytest.mark.parametrize("value", ["2", "y", "enable", "-1", "truee"])
def test_anything_else_is_an_error_naming_the_variable_value_and_spellings(value):
    with pytest.raises(ValueError) as raised:
        parse_flag("FASTBERT_X", value)
    message = str(raised.value)
    assert f"FASTBERT_X={value!r}" in message
    assert all(spelling in message for spelling in (*TRUE, *FALSE[:-1], "empty"))


def test_unset_is_the_default(monkeypatch):
    monkeypatch.delenv("FASTBERT_X", raising=False)
    assert flag("FASTBERT_X") is False and flag("FASTBERT_X", default=True) is True
    monkeypatch.setenv("FASTBERT_X", "")
    assert flag("FASTBERT_X", default=True) is False  # set but empty: off, whatever the default


@pytest.fixture
def run_setup(monkeypatch):
    """setup.py's distribution (stopped before any build) under the given FASTBERT_NO_EXT."""
    core = pytest.importorskip("distutils.core", reason="distutils (setuptools' copy) is needed")
    monkeypatch.chdir(REPO)

    def run(value: str):
        monkeypatch.setenv("FASTBERT_NO_EXT", value)
        return core.run_setup(str(REPO / "setup.py"), script_args=["--name"], stop_after="init")

    return run


def test_setup_follows_the_rule(run_setup):
    assert "fastbert._C" in [ext.name for ext in run_setup("false").ext_modules or []]
    assert not run_setup("Yes").ext_modules
    with pytest.raises(ValueError, match="FASTBERT_NO_EXT='maybe'"):
        run_setup("maybe")


def test_setup_reads_the_rule_without_importing_torch():
    code = ("import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py'); "
            "assert 'torch' not in sys.modules and 'fastbert' not in sys.modules, 'setup.py imported the package'")
    finished = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              env={"PATH": "", "FASTBERT_NO_EXT": "on"})
    assert finished.returncode == 0, finished.stderr
