"""What the benchmark ran on: versions, devices, backends, the fastbert commit, the matmul peak."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from fastbert.cpu import allocator
from fastbert.cpu.info import cpu_features, cpu_name


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:  # noqa: BLE001 - a broken optional package is reported, not raised
        return f"not available ({type(exc).__name__})"
    return getattr(module, "__version__", "unknown")


def fastbert_commit() -> str | None:
    """The git commit of the checkout fastbert is imported from, or None (installed from a wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def cuda_driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def cpu_clock_probe(repeats: int = 50) -> float:
    """One core's fp32 GEMM rate right now, in GFLOP/s (a 256^3 torch.mm, the best of `repeats`): a probe of the
    clock, recorded before and after a benchmark so that runs on a machine whose clock moves (a VM, turbo) can be
    told apart. Not the CPU's peak."""
    threads = torch.get_num_threads()
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return round(2 * 256**3 / best / 1e9, 1)


def device_info(device: torch.device) -> dict:
    """Name and properties of `device` (CUDA: name, capability, memory, driver; CPU: threads)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": cuda_driver_version(),
            "cuda_runtime": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "features": cpu_features(),
        "allocator": allocator.state(),  # glibc as it is, or fastbert.keep_freed_memory()
    }


def versions() -> dict:
    import fastbert

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fastbert": fastbert.__version__,
        "fastbert_commit": fastbert_commit(),
    }


def extension_status() -> str:
    from fastbert import extension

    problem = extension.load_problem()
    if problem is not None:
        return problem
    cuda = "with CUDA kernels" if extension.has_cuda_kernels() else "CPU kernels only"
    return f"built ({cuda})"


def backends() -> dict:
    import fastbert

    return dict(fastbert.available_backends())


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in `dtype` on a CUDA device: the MFU denominator."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start.record()
        torch.matmul(a, b)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]
