"""Loading of the compiled extension fastbert._C (CPU and CUDA kernels from csrc/).

A missing or broken extension never breaks `import fastbert`: the torch and triton paths carry on,
and `load_problem()` says why the extension is absent (shown by `fastbert info`).
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def _load():
    if os.environ.get("FASTBERT_NO_EXT", "0") not in ("", "0"):
        return None, "disabled by FASTBERT_NO_EXT=1"
    try:
        from fastbert import _C
    except ImportError as exc:
        return None, f"fastbert._C is not built ({exc})"
    except Exception as exc:  # a broken binary must not break import fastbert
        return None, f"fastbert._C failed to load: {exc}"
    return _C, None


def load_problem() -> str | None:
    """None if fastbert._C is usable, else why not."""
    return _load()[1]


def module():
    """The loaded fastbert._C module (raises if unavailable)."""
    ext, problem = _load()
    if ext is None:
        raise RuntimeError(problem)
    return ext


def has_cuda_kernels() -> bool:
    ext, _ = _load()
    return bool(ext is not None and getattr(ext, "has_cuda", lambda: False)())
