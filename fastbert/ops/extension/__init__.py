"""The compiled extension's kernels (fastbert._C on CPU, fastbert._C_cuda on CUDA) as fastbert ops.

The kernel library in csrc/ does not link libtorch (see csrc/README.md): it takes raw pointers,
sizes and dtype codes. The modules here are the only place that talks to it, one per op
(mirroring kernels/<op>.py), each registering torch.library custom ops named
`fastbert::extension_<op>_{fwd,bwd}` with fake implementations and autograd. This package's
__init__ holds what the registrations need (devices, dtypes, limits) and stays light: the op
modules are imported only when a call first runs on the "cpp" or "cuda" backend.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastbert import extension as loader
from fastbert.backend import cpp_probe, cuda_probe
from fastbert.registry import Implementation, Signature

CPU_DTYPES = frozenset({torch.float32, torch.bfloat16})
CUDA_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def implementations(op: str, target: str, cuda_supports: Callable | None = None,
                    binders: tuple[str | None, str | None] = (None, None)) -> tuple[Implementation, ...]:
    """The "cpp" (CPU kernels) and "cuda" (CUDA kernels) implementations of `op`, both at `target`;
    binders: (cpp's, cuda's) "module:attribute" (registry.Implementation.binder)."""
    return (
        Implementation(op=op, backend="cpp", target=target, devices=frozenset({"cpu"}), dtypes=CPU_DTYPES,
                       probe=cpp_probe, binder=binders[0]),
        Implementation(op=op, backend="cuda", target=target, devices=frozenset({"cuda"}), dtypes=CUDA_DTYPES,
                       probe=cuda_probe, supports=cuda_supports, binder=binders[1]),
    )


def layer_norm_width_problem(call: Signature) -> str | None:
    """The CUDA LayerNorm's widest row, read from fastbert._C (kMaxLayerNormCols in csrc)."""
    limit = loader.module().CUDA_MAX_LAYER_NORM_COLS
    if call.width > limit:
        return f"its add_layer_norm kernel takes rows of at most {limit} elements, got {call.width}"
    return None
