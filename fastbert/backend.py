"""Backend selection: which implementation of each fused op runs.

Backends:
  "torch"  the plain PyTorch references in fastbert/ops (always available, any device)
  "triton" the Triton kernels in fastbert.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  "cuda"   the CUDA kernels of the compiled extension fastbert._C (CUDA tensors)
  "cpp"    the CPU kernels of the compiled extension fastbert._C (CPU tensors)
  "auto"   per op and device, the fastest available one (see AUTO_PREFERENCE), else "torch"

An explicitly chosen backend that cannot run an op on the given tensor raises BackendUnavailableError
with the reason. An op that a backend does not implement at all (attention in "cuda"/"cpp") runs on
the next implementation in the auto order, so a model runs whole under any backend.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp", "auto")

# Which backends implement which op (beyond "torch", which implements all of them).
OPS_BY_BACKEND = {
    "triton": {"bias_gelu", "add_layer_norm", "attention", "varlen_attention"},
    "cuda": {"bias_gelu", "add_layer_norm"},
    "cpp": {"bias_gelu", "add_layer_norm"},
}

# Which input dtypes each backend's kernels take (the torch references take any float dtype).
DTYPES_BY_BACKEND = {
    "triton": {torch.float32, torch.float16, torch.bfloat16},
    "cuda": {torch.float32, torch.float16, torch.bfloat16},
    "cpp": {torch.float32, torch.bfloat16},
}

# Widest last dimension a backend's kernel takes for an op (wider rows go to the next choice under
# "auto"; an explicit choice raises). The Triton LayerNorm holds a row in registers and spills past 4096.
MAX_WIDTH = {("triton", "add_layer_norm"): 4096}
_WIDTH_LIMITED_OPS = {op for _, op in MAX_WIDTH}

# "auto": for each device type and op, the order in which backends are tried. Decided by
# measurement (docs/benchmarks.md): on CPU the Triton interpreter is never chosen automatically.
# CPU bias_gelu / add_layer_norm: "cpp" (fastbert._C) first, measured faster than the torch reference
# forward and forward+backward at 4096 x 768 and 4096 x 3072, fp32 and bf16 (docs/benchmarks.md,
# "CPU kernels (fastbert._C, backend cpp)"); without the extension "auto" falls back to torch.
AUTO_PREFERENCE = {
    "cuda": {
        "bias_gelu": ("triton", "cuda", "torch"),
        "add_layer_norm": ("triton", "cuda", "torch"),
        "attention": ("triton", "torch"),
        "varlen_attention": ("triton", "torch"),
    },
    "cpu": {
        "bias_gelu": ("cpp", "torch"),
        "add_layer_norm": ("cpp", "torch"),
        "attention": ("torch",),
        "varlen_attention": ("torch",),
    },
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _validate_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = _validate_name(os.environ.get("FASTBERT_BACKEND", "auto").strip().lower() or "auto")


def current_backend() -> str:
    """The backend name in force ("auto" unless set by use_backend or FASTBERT_BACKEND)."""
    return _current


class use_backend(contextlib.ContextDecorator):
    """Select the backend. `fastbert.use_backend("triton")` sets it for the process;
    `with fastbert.use_backend("torch"): ...` sets it for a block and restores the previous one."""

    def __init__(self, name: str):
        global _current
        self._previous = _current
        _current = _validate_name(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _current
        _current = self._previous
        return False


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_problem() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not break fastbert
        return f"importing triton failed: {exc}"
    return None


def _extension_problem(need_cuda: bool) -> str | None:
    from fastbert import extension

    problem = extension.load_problem()
    if problem is not None:
        return problem
    if need_cuda and not extension.has_cuda_kernels():
        return "fastbert._C was built without CUDA kernels (no nvcc at build time)"
    return None


def backend_problem(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend `name` cannot run on `device` (None = on this machine at all); None if it can."""
    device_type = torch.device(device).type if device is not None else None
    if name == "torch":
        return None
    if name == "triton":
        problem = _triton_import_problem()
        if problem:
            return problem
        if device_type == "cpu" and not triton_interpreting():
            return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
        if device_type is None and not (torch.cuda.is_available() or triton_interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter)"
        return None
    if name == "cuda":
        if device_type == "cpu":
            return "the cuda backend needs CUDA tensors"
        if device_type is None and not torch.cuda.is_available():
            return "no CUDA device"
        return _extension_problem(need_cuda=True)
    if name == "cpp":
        if device_type not in (None, "cpu"):
            return f"the cpp backend runs on CPU tensors, got a {device_type} tensor"
        return _extension_problem(need_cuda=False)
    if name == "auto":
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends() -> dict[str, bool | str]:
    """For each backend: True if it can run on this machine, else the reason it cannot."""
    return {name: backend_problem(name) or True for name in BACKENDS}


def _auto_order(op: str, device_type: str) -> tuple[str, ...]:
    return AUTO_PREFERENCE.get(device_type, {}).get(op, ("torch",))


_resolved: dict[tuple, str] = {}


def resolve(op: str, tensor: torch.Tensor) -> str:
    """The concrete backend that runs `op` on `tensor` under the current selection.

    The answer depends only on (selection, op, device type, dtype, interpreter flag), so it is
    memoized: the per-call cost is one dict lookup, which torch.compile traces as a constant.
    """
    width = tensor.shape[-1] if op in _WIDTH_LIMITED_OPS and tensor.dim() else 0
    key = (_current, op, tensor.device.type, tensor.dtype, width, triton_interpreting())
    choice = _resolved.get(key)
    if choice is None:
        choice = _resolve_uncached(op, tensor.device, tensor.dtype, width)
        _resolved[key] = choice
    return choice


def _dtype_problem(name: str, dtype: torch.dtype) -> str | None:
    supported = DTYPES_BY_BACKEND.get(name)
    if supported is None or dtype in supported:
        return None
    names = ", ".join(sorted(str(d).replace("torch.", "") for d in supported))
    return f"its kernels take {names} inputs, got {str(dtype).replace('torch.', '')}"


def _width_problem(name: str, op: str, width: int) -> str | None:
    limit = MAX_WIDTH.get((name, op))
    if limit is None or width <= limit:
        return None
    return f"its {op} kernel takes rows of at most {limit} elements, got {width}"


def _problem(name: str, op: str, device: torch.device, dtype: torch.dtype, width: int) -> str | None:
    return backend_problem(name, device) or _dtype_problem(name, dtype) or _width_problem(name, op, width)


def _resolve_uncached(op: str, device: torch.device, dtype: torch.dtype, width: int) -> str:
    requested = _current
    if requested == "torch":
        return "torch"
    if requested != "auto" and op in OPS_BY_BACKEND[requested]:
        problem = _problem(requested, op, device, dtype, width)
        if problem is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run {op} on {device}: {problem}")
        return requested
    # "auto", or an explicit backend that lacks this op: the first runnable choice in the auto order.
    for candidate in _auto_order(op, device.type):
        if _problem(candidate, op, device, dtype, width) is None:
            return candidate
    return "torch"
