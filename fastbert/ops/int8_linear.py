"""int8_linear: activation(x @ (weight_int8 * weight_scale).T + bias), x quantized per token (fastbert.quantize).

The op behind fastbert.quantize's Int8Linear and the int8 GEMMs an inference plan binds, so the registry chooses
for both (fastbert/cpu/int8_linear.py has the arithmetic):
  "torch"   int8_linear_ref: the same integer products in fp64, any device and dtype (the oracle and fallback);
  "onednn"  fastbert._C's row quantization, oneDNN's int8 GEMM on the packed weight, fastbert._C's dequantizing
            epilogue: CPU, fp32/bf16, where int8_linear.problem() lets it run (VNNI or AMX, torch's private
            onednn ops; the machine record's int8 rows). Inference only.
"""
from __future__ import annotations

import functools

import torch

from fastbert import backend
from fastbert.backend import REGISTRY, runs_anywhere
from fastbert.cpu import int8_linear as cpu_int8
from fastbert.ops._dispatch import implementation
from fastbert.registry import Implementation, Signature


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                activation: str | None = None, packed_weight: torch.Tensor | None = None) -> torch.Tensor:
    """On the implementation the registry picks for this call; packed_weight: the oneDNN-packed weight if the
    caller caches one (Int8Linear does), else it is packed here when the oneDNN path runs."""
    if activation not in cpu_int8.GELU_CODES:
        raise ValueError(f"activation must be None or one of {tuple(cpu_int8.GELU_CODES)[1:]}, got {activation!r}")
    run = implementation("int8_linear", x, grad=backend.records_autograd(x))
    return run(x, weight_int8, weight_scale, bias, activation, packed_weight)


def reference(x, weight_int8, weight_scale, bias, activation=None, packed_weight=None):
    return cpu_int8.int8_linear_ref(x, weight_int8, weight_scale, bias, activation)


def bind(run, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
         activation: str | None = None, packed_weight: torch.Tensor | None = None):
    """x -> int8_linear(x, ...) on `run`, the weight packed once for the oneDNN path."""
    if run is not reference and packed_weight is None:
        packed_weight = cpu_int8.prepack(weight_int8)
    return functools.partial(run, weight_int8=weight_int8, weight_scale=weight_scale, bias=bias,
                             activation=activation, packed_weight=packed_weight)


def _onednn_problem(device: str) -> str | None:
    return f"int8 GEMMs run on CPU tensors, got {device}" if device != "cpu" else cpu_int8.problem()


def _refuse_autograd(signature: Signature) -> str | None:
    return "the int8 GEMM has no backward (autograd is recording)" if signature.grad else None


REGISTRY.register(Implementation(
    op="int8_linear", backend="torch", target="fastbert.ops.int8_linear:reference", devices=None, dtypes=None,
    probe=runs_anywhere, binder="fastbert.ops.int8_linear:bind",
))
REGISTRY.register(Implementation(
    op="int8_linear", backend="onednn", target="fastbert.cpu.int8_linear:int8_linear_packed",
    devices=frozenset({"cpu"}), dtypes=frozenset(cpu_int8.DTYPES), probe=_onednn_problem, supports=_refuse_autograd,
    binder="fastbert.ops.int8_linear:bind",
))
