"""The wheel ships every package of the source tree: setup.py finds them, nothing is listed by hand.

(.ci/run checks a real wheel and sdist: scripts/check_installed_wheel.py.)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
run_setup = pytest.importorskip("distutils.core", reason="distutils (setuptools' copy) is needed").run_setup


@pytest.fixture(scope="module")
def distribution(monkeypatch_module):
    monkeypatch_module.setenv("FASTBERT_NO_EXT", "1")  # the packages only: no compiler probing
    monkeypatch_module.chdir(REPO)
    return run_setup(str(REPO / "setup.py"), script_args=["--name"], stop_after="init")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patcher:
        yield patcher


def source_packages() -> set[str]:
    """Every folder holding Python files under fastbert/ and kernels/, as the package it ships as."""
    found = set()
    for top, shipped_as in (("fastbert", "fastbert"), ("kernels", "fastbert.kernels")):
        for module in (REPO / top).rglob("*.py"):
            parts = module.parent.relative_to(REPO / top).parts
            if "__pycache__" not in parts:
                found.add(".".join((shipped_as, *parts)))
    return found


def test_every_source_folder_ships_as_a_package(distribution):
    shipped = set(distribution.packages)
    missing = sorted(source_packages() - shipped)
    assert not missing, f"folders with Python files that the wheel leaves out (an __init__.py missing?): {missing}"
    assert "fastbert.ops.extension" in shipped and "fastbert.kernels" in shipped


def test_nothing_ships_outside_fastbert(distribution):
    """kernels/ ships as fastbert.kernels, never as a top-level `kernels` (HuggingFace's kernel library)."""
    assert all(name == "fastbert" or name.startswith("fastbert.") for name in distribution.packages)
    assert (REPO / "fastbert" / "kernels").resolve() == (REPO / "kernels").resolve()


def test_kernels_folder_is_not_a_regular_package():
    """A kernels/__init__.py would make the checkout's kernels/ a regular top-level package that wins
    over HuggingFace's `kernels` (which transformers imports) whenever the checkout root is on sys.path."""
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_import_kernels_from_the_checkout_root_is_not_ours():
    """`python -c "import fastbert"` from the root puts the root first on sys.path, as pytest does."""
    probe = ("import importlib.util, fastbert, fastbert.kernels.attention as a;"
             "print(importlib.util.find_spec('kernels').origin); print(a.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    hf_origin, ours = result.stdout.split()[-2:]
    assert Path(ours).resolve().parent == (REPO / "kernels").resolve()
    # HuggingFace's package when installed; otherwise our folder is at most a namespace portion (origin None)
    assert hf_origin == "None" or not Path(hf_origin).resolve().is_relative_to(REPO), hf_origin
