"""glibc's malloc told to keep the memory a forward frees, so the next forward does not fault it in again.

glibc serves blocks over its mmap threshold (dynamic, at most 32 MiB) with mmap and returns them with munmap,
and trims the top of its heap once the free space there passes its trim threshold. A large batch's activations
(all-MiniLM-L6-v2 at 64 x 256 tokens: the fused QKV output and the FFN's inner activations, 50-70 MiB a layer)
are such blocks, so every forward maps them afresh and the kernel zero-fills each page on first touch: 155k-200k
minor page faults a forward on the AVX2 AMD EPYC, whose forward ran 1.10x faster without them
(docs/engineering/perf-notes.md, "Large batches and glibc's freed memory"). HF's forward pays more (330k-360k
faults; 1.19x). ONNX Runtime and OpenVINO keep such
memory in their own arenas; `keep_freed_memory()` gives torch's CPU tensors the same: no mmap for large
blocks, no trimming. The process then holds on to its peak heap (measured: +35 to +140 MiB over a default
process's peak) and reuses it.

It changes the whole process's malloc, for the rest of its life, so a library import never does it unasked:
call `fastbert.keep_freed_memory()`, or set FASTBERT_KEEP_FREED_MEMORY=1 (applied at `import fastbert`).
`fastbert serve` does it by default (--keep-freed-memory false to leave glibc as it is). Linux with glibc
only; elsewhere `problem()` says why and nothing changes. Decided by benchmarks/isolated_latency.py
--allocators default,keep.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import warnings

from fastbert.env import flag

ENVIRONMENT_VARIABLE = "FASTBERT_KEEP_FREED_MEMORY"
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: the heap's free top is never returned

_kept = False


@functools.lru_cache(maxsize=None)
def _mallopt():
    """glibc's mallopt, or the reason there is none."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None, f"the C library here is not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown'})"
    function = getattr(ctypes.CDLL(None), "mallopt", None)
    if function is None:
        return None, "this C library has no mallopt"
    function.argtypes, function.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return function, None


def problem() -> str | None:
    """Why the allocator cannot be told to keep freed memory here; None if it can."""
    return _mallopt()[1]


def keep_freed_memory() -> None:
    """From now on this process's malloc keeps what it frees (no mmap for large blocks, no trimming), so large
    CPU batches stop re-faulting their activations every forward. Idempotent; RuntimeError where `problem()`."""
    global _kept
    mallopt, reason = _mallopt()
    if mallopt is None:
        raise RuntimeError(f"keep_freed_memory: {reason}")
    if _kept:
        return
    # mmap first: with mmap off, a block too large for a thread's arena is served from the main heap
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        raise RuntimeError("keep_freed_memory: glibc's mallopt refused M_MMAP_MAX=0 or M_TRIM_THRESHOLD")
    _kept = True


def is_kept() -> bool:
    """Whether keep_freed_memory() has run in this process."""
    return _kept


def state() -> str:
    """One line for `fastbert info` and `fastbert serve`'s /info."""
    if _kept:
        return "freed memory kept (glibc: no mmap for large blocks, no trimming)"
    reason = problem()
    return f"the C library's default ({reason})" if reason else \
        f"glibc's default (freed large blocks go back to the OS; {ENVIRONMENT_VARIABLE}=1 keeps them)"


def keep_if_possible(asked_by: str) -> bool:
    """keep_freed_memory(), or a warning naming `asked_by` and why not (the allocator is then left as it is)."""
    try:
        keep_freed_memory()
    except RuntimeError as exc:
        warnings.warn(f"{asked_by} asks to keep freed memory, but {exc}", RuntimeWarning, stacklevel=3)
        return False
    return True


def apply_environment() -> None:
    """At `import fastbert`: keep freed memory when FASTBERT_KEEP_FREED_MEMORY is on (a value that is not a
    boolean raises, naming it)."""
    if flag(ENVIRONMENT_VARIABLE):
        keep_if_possible(f"{ENVIRONMENT_VARIABLE}=1")
