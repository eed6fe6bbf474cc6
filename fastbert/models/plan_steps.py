"""What an inference plan binds per step (fastbert/models/plan.py builds and runs the plan): the step tuples, and
`Resolver`, which binds each step to the registry's choice for the plan's device and dtype (fastbert.ops._dispatch.bind;
the bias goes where ops.linear.splits_bias says), int8 GEMMs included."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from fastbert import backend
from fastbert.models import fused_qkv
from fastbert.models.program import BoundCall
from fastbert.ops import _dispatch
from fastbert.ops.linear import splits_bias
from fastbert.quantize import Int8Linear


class LayerSteps(NamedTuple):
    """One layer as bound callables, the bound executor of program.post_norm: x -> y for the GEMMs,
    (y, residual) -> hidden for the norms."""

    qkv: Callable
    heads: int
    head_dim: int
    scale: float
    attention_dense: Callable
    attention_norm: Callable
    ffn_in: Callable  # GEMM and activation
    ffn_dense: Callable
    ffn_norm: Callable

    def attention(self, hidden: torch.Tensor, call: BoundCall) -> torch.Tensor:
        return call.attend(self.qkv(hidden), self.heads, self.head_dim, self.scale, *call.shape)

    def attention_out(self, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.attention_norm(self.attention_dense(context), hidden)

    def ffn_out(self, inner: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(self.ffn_dense(inner), hidden)


class Unplannable(Exception):
    """What keeps a model on the general forward; the message says which module or setting."""


# ---- kernels, resolved once ---------------------------------------------------------------------------

class Resolver:
    """Binds each step to the implementation the registry picks for the plan's device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.probe = torch.empty(0, device=device, dtype=dtype)
        self.cpu = device.type == "cpu"

    def name(self, op: str, width: int = 0, head_dim: int = 0) -> str:
        return backend.resolved_backend(op, self.probe, width=width, head_dim=head_dim, grad=False)

    def implementation(self, op: str, width: int = 0, head_dim: int = 0) -> Callable:
        return _dispatch.implementation(op, self.probe, width=width, head_dim=head_dim, grad=False)

    def gemm(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> Callable:
        """x -> activation(x @ weight.T + bias), bound by the registry's choice (on CPU: fastbert's few-rows
        kernels, then oneDNN's packed GEMM, by row count: onednn_linear.bind)."""
        return _dispatch.bind("linear", self.probe, weight=weight, bias=bias, activation=activation)

    def gemm_then_norm(self, linear: nn.Module, norm: nn.LayerNorm) -> tuple[Callable, Callable]:
        """(x -> y, (y, residual) -> LayerNorm(y + residual)): the bias in the GEMM when its library
        adds it itself (oneDNN, int8) or when the norm is the torch reference, else in the fused norm."""
        if is_int8(linear):
            return int8_module_gemm(self, linear), self.norm(norm)
        split = splits_bias(self.name("linear"), self.name("add_layer_norm", width=norm.weight.shape[0]))
        gemm = self.gemm(linear.weight, None if split else linear.bias)
        return gemm, self.norm(norm, linear.bias if split else None)

    def norm(self, norm: nn.LayerNorm, x_bias: torch.Tensor | None = None) -> Callable:
        return _dispatch.bind("add_layer_norm", self.probe, width=norm.weight.shape[0], weight=norm.weight,
                              bias=norm.bias, eps=norm.eps, x_bias=x_bias)

    def gemm_tanh(self, linear: nn.Linear) -> Callable:
        """x -> tanh(x @ W.T + b), a BertPooler: the tanh in oneDNN's epilogue, else after the GEMM."""
        if self.name("linear") == "onednn":
            return self.gemm(linear.weight, linear.bias, "tanh")
        gemm = self.gemm(linear.weight, linear.bias)
        return lambda x: torch.tanh(gemm(x))

    def gemm_gelu(self, linear: nn.Module, approximate: str) -> Callable:
        """x -> GELU(x @ W.T + b): in the GEMM's epilogue on int8, and on oneDNN where the machine record says
        it pays (ops.linear.gelu_epilogue_pays), else GEMM then bias_gelu."""
        from fastbert.ops.linear import GELU_ACTIVATION, gelu_epilogue_pays

        if is_int8(linear):
            return int8_module_gemm(self, linear, GELU_ACTIVATION[approximate])
        if self.name("linear") == "onednn" and gelu_epilogue_pays():
            return self.gemm(linear.weight, linear.bias, GELU_ACTIVATION[approximate])
        split = splits_bias(self.name("linear"), self.name("bias_gelu"))
        gemm = self.gemm(linear.weight, None if split else linear.bias)
        activation = _dispatch.bind("bias_gelu", self.probe, bias=linear.bias if split else None,
                                    approximate=approximate)
        return lambda x: activation(gemm(x))


def is_int8(module: nn.Module) -> bool:
    return type(module) is Int8Linear


def int8_gemm(resolver: Resolver, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
              packed_weight: torch.Tensor | None = None, activation: str | None = None) -> Callable:
    """x -> activation(x @ W.T + b) on an int8 weight (fastbert.quantize): the registry's int8_linear, bound."""
    return _dispatch.bind("int8_linear", resolver.probe, weight_int8=weight_int8, weight_scale=weight_scale,
                          bias=bias, activation=activation, packed_weight=packed_weight)


def int8_module_gemm(resolver: Resolver, linear: Int8Linear, activation: str | None = None) -> Callable:
    """An Int8Linear's GEMM, on the packed weight the module caches (no second packed copy)."""
    return int8_gemm(resolver, linear.weight_int8, linear.weight_scale, linear.bias, linear.packed_weight(), activation)


def qkv_gemm(resolver: Resolver, owner: nn.Module, query: nn.Module, key: nn.Module,
             value: nn.Module) -> tuple[Callable, int]:
    """(x -> the fused query/key/value projection, its output features). Three int8 Linears become one int8
    GEMM: they quantize the same input with the same per-token scales, so the concatenated weight gives the
    same columns as the three GEMMs (and one quantization instead of three)."""
    modules = (query, key, value)
    if all(map(is_int8, modules)):
        weight = torch.cat([m.weight_int8 for m in modules])
        scale, bias = torch.cat([m.weight_scale for m in modules]), torch.cat([m.bias for m in modules])
        return int8_gemm(resolver, weight, scale, bias), weight.shape[0]
    if any(map(is_int8, modules)):
        raise Unplannable("query/key/value mix int8 and float Linears")
    weight, bias = fused_qkv.fused_parameters(owner, query, key, value)  # the live forward's cached copy
    return resolver.gemm(weight, bias), weight.shape[0]
