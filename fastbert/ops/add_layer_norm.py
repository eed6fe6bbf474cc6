"""add_layer_norm: LayerNorm(dropout(x + x_bias) + residual) with statistics in fp32.

In BERT this follows every dense projection: x is the matmul output without its bias, x_bias the
dense bias, residual the layer input. Fusing bias, dropout, residual add and LayerNorm saves three
full passes over the activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert.backend import REGISTRY
from fastbert.kernels import limits as triton_limits
from fastbert.ops import extension
from fastbert.ops._dispatch import compute_dtype, implementation
from fastbert.ops._shared import register_torch_and_triton, triton_cpu_problem
from fastbert.registry import Signature


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reference: fp32 math for half inputs (eps=1e-12 would vanish in fp16), result in x's dtype."""
    math_dtype = compute_dtype(x.dtype)
    h = x.to(math_dtype)
    if x_bias is not None:
        h = h + x_bias.to(math_dtype)
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p, training=True)
    if residual is not None:
        h = h + residual.to(math_dtype)
    w = weight.to(math_dtype)
    b = bias.to(math_dtype) if bias is not None else None
    return F.layer_norm(h, (h.shape[-1],), w, b, eps).to(x.dtype)


def _triton_supports(call: Signature) -> str | None:
    return triton_cpu_problem(call) or triton_limits.layer_norm_width_problem(call.width)


def bind(run, weight, bias, eps: float, x_bias=None):
    """(x, residual) -> LayerNorm(x + x_bias + residual) on `run` with the norm's parameters fixed."""
    return lambda x, residual: run(x, residual, weight, bias, eps, x_bias=x_bias)


BIND = "fastbert.ops.add_layer_norm:bind"
register_torch_and_triton("add_layer_norm", "fastbert.ops.add_layer_norm:add_layer_norm_ref",
                          "fastbert.kernels.add_layer_norm:add_layer_norm_triton", triton_supports=_triton_supports,
                          binder=BIND)
for _implementation in extension.implementations(
    "add_layer_norm", "fastbert.ops.extension.add_layer_norm:add_layer_norm_extension",
    cuda_supports=extension.layer_norm_width_problem,
    binders=("fastbert.ops.extension.add_layer_norm:bind_cpu", BIND),
):
    REGISTRY.register(_implementation)


def _check_vector(name: str, value: torch.Tensor | None, width: int) -> None:
    if value is not None and (value.dim() != 1 or value.shape[0] != width):
        raise ValueError(f"{name} must have shape ({width},) (the hidden size), got {tuple(value.shape)}")


def _check_arguments(x, residual, weight, bias, eps, x_bias, dropout_p) -> None:
    width = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_vector("weight", weight, width)
    _check_vector("bias", bias, width)
    _check_vector("x_bias", x_bias, width)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not eps >= 0.0:  # 0 is allowed: one public ELECTRA checkpoint has layer_norm_eps=0.0
        raise ValueError(f"eps must be >= 0, got {eps}")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) over the last dimension. Pass dropout_p=0 in eval."""
    _check_arguments(x, residual, weight, bias, eps, x_bias, dropout_p)
    if residual is not None and residual.dtype != x.dtype:
        # a bf16 GEMM output (autocast) onto an fp32 residual: x + residual promotes, as in the HF layer
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    run = implementation("add_layer_norm", x, width=x.shape[-1])
    return run(x, residual, weight, bias, eps, x_bias=x_bias, dropout_p=dropout_p)
