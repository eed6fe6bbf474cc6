"""Shared setup of the pytest-benchmark suites (never part of the default test run).

Run: python -m pytest benchmarks --benchmark-group-by=group [--benchmark-json=out.json]
Each benchmark's group is one (op, device, dtype, shape, direction), so backends line up side by side.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

import fastbert

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels, so that a timed CUDA function measures the work and not the launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_skip_reason(backend: str, device: str) -> str | None:
    """None if `backend` can run on `device` here, else why not (the test skips with it)."""
    if device == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    if backend == "triton" and device == "cpu":
        return "Triton is benchmarked on CUDA only (the CPU interpreter is not a fast path)"
    return fastbert.backend.backend_problem(backend, device)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what produced the numbers next to them in the saved JSON."""
    from fastbert import extension

    machine_info["torch"] = torch.__version__
    machine_info["fastbert"] = fastbert.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["platform"] = platform.platform()
    machine_info["fastbert_extension"] = extension.load_problem() or "built"
    machine_info["fastbert_cuda_kernels"] = extension.has_cuda_kernels()
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if HAS_CUDA else None
    machine_info["cuda_version"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        machine_info["triton"] = None
    try:
        machine_info["load_average"] = os.getloadavg()
    except OSError:
        pass
