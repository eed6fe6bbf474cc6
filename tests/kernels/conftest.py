"""Shared setup for the Triton kernel tests.

These tests run the kernels on CUDA tensors when a GPU is present, else on CPU tensors in the Triton
interpreter: run them in their own invocation, `TRITON_INTERPRET=1 python -m pytest tests/kernels`
(the variable must be set before triton is imported). Without either, every test here is skipped.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fastbert.kernels.host import triton_interpreting

INTERPRETING = triton_interpreting()
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _skip_reason() -> str | None:
    if not TRITON_IMPORTABLE:
        return "triton is not installed"
    if not (INTERPRETING or torch.cuda.is_available()):
        return ("Triton kernel tests need a CUDA device or the interpreter: "
                "run `TRITON_INTERPRET=1 python -m pytest tests/kernels` in its own invocation")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def device() -> str:
    """Where the kernels run: CPU tensors under the interpreter, else CUDA."""
    return "cpu" if INTERPRETING else "cuda"
