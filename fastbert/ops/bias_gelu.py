"""bias_gelu: y = GELU(x + bias), exact erf ("none") or tanh approximation ("tanh")."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastbert.backend import REGISTRY
from fastbert.ops import extension
from fastbert.ops._dispatch import compute_dtype, implementation
from fastbert.ops._shared import register_torch_and_triton

APPROXIMATIONS = ("none", "tanh")


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """Reference: fp32 math for half inputs, result in x's dtype. The fallback and the test oracle."""
    math_dtype = compute_dtype(x.dtype)
    pre_activation = x.to(math_dtype)
    if bias is not None:
        pre_activation = pre_activation + bias.to(math_dtype)
    return F.gelu(pre_activation, approximate=approximate).to(x.dtype)


def bind(run, bias, approximate: str):
    """x -> GELU(x + bias) on `run` with the bias fixed."""
    return functools.partial(run, bias=bias, approximate=approximate)


BIND = "fastbert.ops.bias_gelu:bind"
register_torch_and_triton("bias_gelu", "fastbert.ops.bias_gelu:bias_gelu_ref",
                          "fastbert.kernels.bias_gelu:bias_gelu_triton", binder=BIND)
for _implementation in extension.implementations("bias_gelu", "fastbert.ops.extension.bias_gelu:bias_gelu_extension",
                                                 binders=("fastbert.ops.extension.bias_gelu:bind_cpu", BIND)):
    REGISTRY.register(_implementation)


def _check_arguments(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[-1]):
        raise ValueError(
            f"bias must have shape ({x.shape[-1]},) to match the last dim of x {tuple(x.shape)}, "
            f"got {tuple(bias.shape)}"
        )


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """GELU(x + bias) over the last dimension, on the backend selected by fastbert.use_backend."""
    _check_arguments(x, bias, approximate)
    return implementation("bias_gelu", x, width=x.shape[-1])(x, bias, approximate)
