"""Shared setup for the Triton kernel tests.

These tests run the kernels on CUDA tensors when a GPU is present, else on CPU tensors in the Triton
interpreter: run them in their own invocation, `TRITON_INTERPRET=1 python -m pytest tests/kernels`
(the variable must be set before triton is imported). Without either, every test here is skipped.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import fastbert

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _map_source_kernels() -> None:
    """From a source checkout without `pip install -e .`, map fastbert.kernels to ./kernels (as
    setup.py's package_dir does), never as a top-level `kernels` package."""
    if importlib.util.find_spec("fastbert.kernels") is not None:
        return
    folder = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "fastbert.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastbert.kernels"] = module
    spec.loader.exec_module(module)
    fastbert.kernels = module


_map_source_kernels()


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


# Absolute slack per dtype in the tolerance rule below (values and gradients are O(1)).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_error(value: torch.Tensor, ref64: torch.Tensor) -> float:
    return (value.double() - ref64).abs().max().item() if ref64.numel() else 0.0


def assert_close_to_ref(fast, torch_same_dtype, ref64, atol, name="output"):
    """err(fast, fp64 ref) <= 2 * err(torch in the same dtype, fp64 ref) + atol."""
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert fast.dtype == torch_same_dtype.dtype, f"{name}: dtype {fast.dtype} != {torch_same_dtype.dtype}"
    fast_error, torch_error = max_error(fast, ref64), max_error(torch_same_dtype, ref64)
    assert fast_error <= 2 * torch_error + atol, (
        f"{name}: max error {fast_error:.3g} vs fp64 reference exceeds 2 * {torch_error:.3g} "
        f"(torch, same dtype) + {atol:g}")


def _leaves(inputs, dtype=None):
    """Fresh leaf copies (optionally cast) of the tensor inputs that require grad; None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point())
            for t in inputs]


def _run(fn, inputs, grad_out):
    output = fn(*inputs)
    output.backward(grad_out.to(output.dtype))
    return output, [None if t is None else t.grad for t in inputs]


def check_against_reference(fast_fn, ref_fn, inputs, atol, names=None):
    """Run fast_fn and ref_fn (same dtype, then on fp64 copies) forward and backward with one random
    upstream gradient, and apply assert_close_to_ref to the output and every input gradient."""
    names = names or [f"input {i}" for i in range(len(inputs))]
    probe = ref_fn(*_leaves(inputs))
    grad_out = torch.randn(probe.shape, device=probe.device, dtype=torch.float64)
    fast, fast_grads = _run(fast_fn, _leaves(inputs), grad_out)
    same, same_grads = _run(ref_fn, _leaves(inputs), grad_out)
    ref, ref_grads = _run(ref_fn, _leaves(inputs, torch.float64), grad_out)
    assert_close_to_ref(fast, same, ref, atol, "output")
    for name, t, g_fast, g_same, g_ref in zip(names, inputs, fast_grads, same_grads, ref_grads):
        if t is not None and t.is_floating_point():
            assert g_fast is not None, f"grad of {name} is missing"
            assert_close_to_ref(g_fast, g_same, g_ref, atol, f"grad of {name}")
