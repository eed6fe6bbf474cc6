"""Backend selection: which implementation of each fused op runs.

Backends:
  "torch"  the plain PyTorch references in fastbert/ops (always available, any device)
  "triton" the Triton kernels in fastbert.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  "cuda"   the CUDA kernels of the compiled extension fastbert._C (CUDA tensors)
  "cpp"    the CPU kernels of the compiled extension fastbert._C (CPU tensors)
  "onednn" packed oneDNN GEMMs for the linear op (CPU tensors, inference)
  "auto"   per op and device, the first backend in AUTO_PREFERENCE that can take the call, else "torch"

What each backend can run is stated once, by the implementations themselves: every op module registers
its implementations in REGISTRY (fastbert/registry.py) with their devices, dtypes and limits. This
module keeps the selection, the machine-level probes per backend and the hand-kept auto order.

An explicitly chosen backend that cannot run an op on the given tensor raises BackendUnavailableError
with the reason. An op that a backend does not implement at all (attention under "cpp") runs on the
first implementation in the auto order that can take it, so a model runs whole under any backend.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

from fastbert.cpu.machine import MachineChoice
from fastbert.kernels.host import triton_interpreting
from fastbert.registry import BackendUnavailableError, Registry, Signature

__all__ = [
    "AUTO_PREFERENCE", "BACKENDS", "REGISTRY", "BackendUnavailableError", "available_backends", "backend_problem",
    "current_backend", "resolved_backend", "use_backend",
]

BACKENDS = ("torch", "triton", "cuda", "cpp", "onednn", "auto")

# "auto": for each device type and op, the order in which backends are tried; backends without a
# registration for the op are skipped, and "torch" ends every list. Decided by measurement
# (docs/engineering/benchmark-log.md): on CPU the Triton interpreter is never chosen automatically. CPU
# bias_gelu / add_layer_norm: "cpp" (fastbert._C) measured faster than the torch reference forward and
# forward+backward at 4096 x 768 and 4096 x 3072, fp32 and bf16 ("CPU kernels (fastbert._C, backend cpp)").
AUTO_PREFERENCE = {
    "cuda": {
        "bias_gelu": ("triton", "cuda", "torch"),
        "add_layer_norm": ("triton", "cuda", "torch"),
        "attention": ("triton", "torch"),
        "varlen_attention": ("triton", "torch"),
        "linear": ("torch",),
        # ModernBERT's ops: Triton kernels, unmeasured on a GPU so far (docs/gpu-validation.md)
        "rotary": ("triton", "torch"),
        "geglu": ("triton", "torch"),
        "window_attention": ("triton", "torch"),
        # unmeasured on a GPU so far; the Triton kernel never builds a (seq x seq) tensor
        "relative_attention": ("triton", "torch"),
        "qkv_attention": ("triton", "torch"),
    },
    "cpu": {
        "bias_gelu": ("cpp", "torch"),
        "add_layer_norm": ("cpp", "torch"),
        "attention": ("torch",),
        # the one CPU-dependent entry: read from the machine record on first use (fastbert/cpu/machine.py)
        "varlen_attention": MachineChoice("varlen_attention_order"),
        "linear": ("onednn", "torch"),  # benchmarks/cpu_linear_order.py (2 threads, AVX2 EPYC: 0.69x F.linear)
        "relative_attention": ("torch",),
        # the cpp kernel on the fused QKV buffer, up to the machine record's length (fastbert/ops/qkv_attention.py)
        "qkv_attention": ("cpp", "torch"),
        "int8_linear": ("onednn", "torch"),  # the reference is fp64 matmuls: the oneDNN int8 GEMM wherever it runs
    },
}

REGISTRY = Registry(AUTO_PREFERENCE)


def _validate_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = _validate_name(os.environ.get("FASTBERT_BACKEND", "auto").strip().lower() or "auto")


_interpreting: bool | None = None


def interpreting() -> bool:
    """TRITON_INTERPRET as it was at fastbert's first look (fastbert.kernels.host parses it).

    Read once per process, as Triton itself fixes it: a kernel module is compiled or interpreted from
    the moment it is imported. (Reading the environment costs ~1 us, and resolution runs ~10 times per
    layer.) Set it before the first fastbert call.
    """
    global _interpreting
    if _interpreting is None:
        _interpreting = triton_interpreting()
    return _interpreting


# Per thread: > 0 while a training-mode forward runs its layers in this thread (see training_forward).
# Not process-wide: a thread serving inference beside a thread that trains keeps its fast path.
_thread_state = threading.local()


class training_forward:
    """Within this block every op call made by this thread counts as recorded by autograd, even under no_grad.

    The encoder decides per forward, from the model's mode, whether the forward trains, and each layer
    runs inside this block when it does (TokenLayout.training). Gradient checkpointing with
    use_reentrant=True runs its first forward under no_grad and recomputes it with grad in backward:
    both passes must take the same implementations (inference-only kernels such as the packed oneDNN
    GEMM refuse autograd calls), or the loss and the gradients come from different numerics, and the
    weights would be re-packed at every training step. Ops fastbert owns also receive the decision as
    an argument; this per-thread flag reaches the implementations that only see tensors.
    """

    def __enter__(self):
        _thread_state.depth = getattr(_thread_state, "depth", 0) + 1

    def __exit__(self, *exc):
        _thread_state.depth -= 1
        return False


def in_training_forward() -> bool:
    """Whether this thread is inside a training-mode forward (training_forward)."""
    return getattr(_thread_state, "depth", 0) > 0


def records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on `tensors`: grad mode and a tensor requiring grad, or a
    training-mode forward in this thread (training_forward)."""
    if getattr(_thread_state, "depth", 0) > 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def current_backend() -> str:
    """The backend name in force ("auto" unless set by use_backend or FASTBERT_BACKEND)."""
    return _current


class use_backend(contextlib.ContextDecorator):
    """Select the backend, three ways:
      `fastbert.use_backend("triton")`            for the process, from now on;
      `with fastbert.use_backend("torch"): ...`   for the block, then the previous one again;
      `@fastbert.use_backend("torch")`            for each call of the function, then the previous one again.
    """

    def __init__(self, name: str):
        global _current
        self._name = _validate_name(name)
        self._before_creation: str | None = _current  # restored by the `with` form and by decorating
        self._outer: list[str] = []  # selections to restore, one per active entry (recursion, threads aside)
        _current = self._name  # the plain call sets it for the process

    def __call__(self, function):
        # Decorating is not selecting: undo what __init__ set; each call selects on entry instead.
        global _current
        if self._before_creation is not None:
            _current, self._before_creation = self._before_creation, None
        return super().__call__(function)

    def __enter__(self):
        global _current
        previous = _current if self._before_creation is None else self._before_creation
        self._before_creation = None
        self._outer.append(previous)
        _current = self._name
        return self

    def __exit__(self, *exc):
        global _current
        _current = self._outer.pop()
        return False


# ---------------------------------------------------------------------------------------------------
# Machine-level probes: device type -> None if the backend's code and device are there, else why not.

def runs_anywhere(device: str) -> None:
    """The torch references need nothing."""
    return None


@functools.lru_cache(maxsize=None)
def _triton_import_problem() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not break fastbert
        return f"importing triton failed: {exc}"
    return None


def _cuda_device_problem(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def triton_probe(device: str) -> str | None:
    """Triton importable, and a CUDA device for CUDA tensors (CPU tensors: see kernels/limits.cpu_problem)."""
    return _triton_import_problem() or _cuda_device_problem(device)


def cpp_probe(device: str) -> str | None:
    from fastbert import extension

    return extension.load_problem()


def cuda_probe(device: str) -> str | None:
    from fastbert import extension

    problem = _cuda_device_problem(device) or extension.load_problem()
    if problem is None and not extension.has_cuda_kernels():
        return "fastbert._C was built without CUDA kernels (no nvcc at build time)"
    return problem


# ---------------------------------------------------------------------------------------------------
# Derived from the registry.

def backend_problem(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend `name` cannot run on `device` (None: on any device here); None if it can."""
    _validate_name(name)
    if name in ("torch", "auto"):
        return None
    device_type = torch.device(device).type if device is not None else None
    takes = REGISTRY.devices_of(name)
    if device_type is not None and takes and device_type not in takes:
        return f"the {name} backend runs on {', '.join(sorted(takes))} tensors, got {device_type}"
    return REGISTRY.availability(name, interpreting(), device_type)


def available_backends() -> dict[str, bool | str]:
    """For each backend: True if it can run some op on this machine, else the reason it cannot."""
    return {name: backend_problem(name) or True for name in BACKENDS}


def signature(op: str, x: torch.Tensor, width: int = 0, head_dim: int = 0, grad: bool = False) -> Signature:
    """What resolution looks at in a call of `op` on `x`."""
    return Signature(op, x.device.type, x.dtype, width, head_dim, grad, interpreting())


@torch.compiler.assume_constant_result
def _resolve_name(requested: str, op: str, device: str, dtype: torch.dtype, width: int, head_dim: int,
                  grad: bool) -> str:
    """The backend that runs the call under the selection `requested`.

    torch.compile runs this once while tracing and keeps the answer as a constant: the probes, the
    environment and the memo dict stay out of the graph. (Plain arguments: dynamo passes a NamedTuple
    to such a function as a bare tuple.) A new selection is a new argument, hence a recompile.
    """
    call = Signature(op, device, dtype, width, head_dim, grad, interpreting())
    return REGISTRY.resolve(requested, call).backend


def resolved_backend(op: str, x: torch.Tensor, *, width: int = 0, head_dim: int = 0, grad: bool = False) -> str:
    """The backend name that would run `op` on `x` under the current selection."""
    return _resolve_name(_current, op, x.device.type, x.dtype, width, head_dim, grad)
