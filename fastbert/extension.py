"""Loading of the compiled extension (kernels from csrc/, built by setup.py; see csrc/README.md).

Two modules, neither linked against libtorch:
  fastbert._C       CPU kernels; `_C.has_cuda()` says whether the same build also compiled
  fastbert._C_cuda  the CUDA kernels (static cudart). It is imported only when torch sees a CUDA
                    device, so machines without a GPU or driver never load CUDA code.

A missing or broken extension never breaks `import fastbert`: the torch, oneDNN and triton paths carry
on. The loader probes once per process and caches the answer; every CPU kernel user asks it through
`cpu_module()` (None without `_C`) or `load_problem()` (why not), never by importing `_C` itself.
`fastbert info` shows the reason.
"""
from __future__ import annotations

import functools
import os

from fastbert.env import flag


@functools.lru_cache(maxsize=None)
def _load():
    if flag("FASTBERT_NO_EXT"):
        return None, f"disabled by FASTBERT_NO_EXT={os.environ['FASTBERT_NO_EXT']}"
    try:
        from fastbert import _C
    except ImportError as exc:
        return None, f"fastbert._C is not built ({exc})"
    except Exception as exc:  # a broken binary must not break import fastbert
        return None, f"fastbert._C failed to load: {exc}"
    return _C, None


@functools.lru_cache(maxsize=None)
def _load_cuda():
    ext, problem = _load()
    if ext is None:
        return None, problem
    if not getattr(ext, "has_cuda", lambda: False)():
        return None, "fastbert._C was built without CUDA kernels (no nvcc at build time)"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        from fastbert import _C_cuda
    except ImportError as exc:
        return None, f"fastbert._C_cuda is not built ({exc})"
    except Exception as exc:
        return None, f"fastbert._C_cuda failed to load: {exc}"
    return _C_cuda, None


def load_problem() -> str | None:
    """None if fastbert._C is usable, else why not."""
    return _load()[1]


def cuda_load_problem() -> str | None:
    """None if the CUDA kernels (fastbert._C_cuda) are usable, else why not."""
    return _load_cuda()[1]


def cpu_module():
    """The loaded fastbert._C module, or None where it is unavailable (`load_problem()` says why)."""
    return _load()[0]


def module():
    """The loaded fastbert._C module (raises if unavailable): for callers that checked `load_problem()`."""
    ext, problem = _load()
    if ext is None:
        raise RuntimeError(problem)
    return ext


def cuda_module():
    """The loaded fastbert._C_cuda module (raises if unavailable)."""
    ext, problem = _load_cuda()
    if ext is None:
        raise RuntimeError(problem)
    return ext


def has_cuda_kernels() -> bool:
    """True when the build compiled the CUDA kernels (fastbert._C.has_cuda()) and, on a machine
    with a CUDA device, fastbert._C_cuda loads."""
    ext, _ = _load()
    if ext is None or not getattr(ext, "has_cuda", lambda: False)():
        return False
    import torch

    if not torch.cuda.is_available():
        return True  # compiled in; never imported without a device
    return _load_cuda()[0] is not None
