"""Shared dispatch: map the backend chosen by fastbert.backend.resolve to an op's implementation."""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from fastbert import backend


_loaded: dict[str, Callable] = {}


def implementation(op: str, tensor: torch.Tensor, table: dict[str, str | Callable]) -> Callable:
    """The callable that runs `op` on `tensor`.

    `table` maps a backend name to the implementation, or to "module:attribute" imported lazily
    (so that importing fastbert never imports triton or the extension). Imports are memoized, so
    after the first call this is two dict lookups, which torch.compile traces without a break.
    """
    target = table[backend.resolve(op, tensor)]
    if callable(target):
        return target
    loaded = _loaded.get(target)
    if loaded is None:
        module_name, attribute = target.split(":")
        loaded = _loaded[target] = getattr(importlib.import_module(module_name), attribute)
    return loaded


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, the input dtype otherwise (fp64 references stay fp64)."""
    return torch.promote_types(dtype, torch.float32)
