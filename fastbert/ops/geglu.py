"""geglu: GELU(input) * gate, the gated feed-forward of ModernBERT (transformers' ModernBertMLP).

x holds [input | gate] along its last dimension, as one Linear (mlp.Wi) writes them: the output has
half x's width. GELU is the exact erf form ("none") or the tanh approximation ("tanh").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert.ops._dispatch import compute_dtype, implementation
from fastbert.ops._shared import register_torch_and_triton

APPROXIMATIONS = ("none", "tanh")


def geglu_ref(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Reference: fp32 math for half inputs, result in x's dtype. The fallback and the test oracle."""
    values, gate = x.to(compute_dtype(x.dtype)).chunk(2, dim=-1)
    return (F.gelu(values, approximate=approximate) * gate).to(x.dtype)


def _geglu_torch(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The "torch" backend: the reference, with the gate multiplied in place when autograd does not
    record (one temporary fewer)."""
    if x.dtype not in (torch.float32, torch.float64) or backend.records_autograd(x):
        return geglu_ref(x, approximate)
    values, gate = x.chunk(2, dim=-1)
    return F.gelu(values, approximate=approximate).mul_(gate)


register_torch_and_triton("geglu", "fastbert.ops.geglu:_geglu_torch", "fastbert.kernels.geglu:geglu_triton")
# Until the hand-kept order in fastbert/backend.py names this op: Triton first on CUDA.


def geglu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(x[..., :n]) * x[..., n:] with n = x.shape[-1] // 2, on the backend fastbert.use_backend selects."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"the last dim of x holds [input | gate] and must be even, got shape {tuple(x.shape)}")
    return implementation("geglu", x, width=x.shape[-1] // 2)(x, approximate)
