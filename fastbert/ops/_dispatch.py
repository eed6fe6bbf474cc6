"""Shared dispatch: the callable that runs an op, chosen by the registry (fastbert/registry.py)."""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from fastbert import backend


class _Loaded:
    """The imported implementations, one attribute "<op>__<backend>" each. An object, not a
    dict: dynamo reads an object's attributes live, while it would keep a stale copy of a dict (or of
    sys.modules) taken before an import that happened during tracing."""


_loaded = _Loaded()


@torch.compiler.assume_constant_result
def _import_target(op: str, backend_name: str) -> str:
    """Import `op`'s implementation on `backend_name` into _loaded; returns its attribute name there.

    Lazy, so that `import fastbert` never imports triton or the extension. Outside the traced code:
    torch.compile runs this once while tracing (dynamo cannot trace importlib) and keeps the string.
    """
    name = f"{op}__{backend_name}"
    if not hasattr(_loaded, name):
        module_name, attribute = backend.REGISTRY.get(op, backend_name).target.split(":")
        setattr(_loaded, name, getattr(importlib.import_module(module_name), attribute))
    return name


# (registry generation, selection, op, device type, dtype, width, head_dim, grad) -> the callable.
_callables: dict[tuple, Callable] = {}


def implementation(op: str, x: torch.Tensor, *, width: int = 0, head_dim: int = 0, grad: bool = False) -> Callable:
    """The callable that runs `op` on `x` under the current backend selection.

    width: the row width for row-wise ops, head_dim for attention (0: not relevant to the op);
    grad: autograd records this call. Memoized in eager mode: after the first call this is one
    dict lookup (the encoder makes about ten such calls per layer). Traced by torch.compile, it
    takes the constant-folded path below.
    """
    if torch.compiler.is_compiling():
        return _resolve(op, x, width, head_dim, grad)
    key = (backend.REGISTRY.generation, backend.current_backend(), op, x.device.type, x.dtype, width, head_dim, grad)
    found = _callables.get(key)
    if found is None:
        found = _callables[key] = _resolve(op, x, width, head_dim, grad)
    return found


def _resolve(op: str, x: torch.Tensor, width: int, head_dim: int, grad: bool) -> Callable:
    backend_name = backend.resolved_backend(op, x, width=width, head_dim=head_dim, grad=grad)
    return getattr(_loaded, _import_target(op, backend_name))


def bind(op: str, probe: torch.Tensor, *, width: int = 0, head_dim: int = 0, **params) -> Callable:
    """`op` for inference calls on tensors like `probe` (device, dtype) with `params` fixed: the registry's
    choice under the current selection, prepared once by that implementation's binder. An inference plan
    binds every step this way, so the registry is its one chooser."""
    name = backend.resolved_backend(op, probe, width=width, head_dim=head_dim, grad=False)
    chosen = backend.REGISTRY.get(op, name)
    if chosen.binder is None:
        raise ValueError(f"{op} on the {name} backend has no binder (only per-call use)")
    module_name, attribute = chosen.binder.split(":")
    binder = getattr(importlib.import_module(module_name), attribute)
    return binder(getattr(_loaded, _import_target(op, name)), **params)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, the input dtype otherwise (fp64 references stay fp64)."""
    return torch.promote_types(dtype, torch.float32)
