"""linear: y = activation(x @ weight.T + bias), with activation None, "gelu" (erf) or "gelu_tanh".

The encoder's GEMMs (fused QKV projection, FFN-in with its GELU, the output projections feeding
add_layer_norm) go through this op, so the registry picks their implementation: the torch reference
(F.linear, MKL on CPU) or, for fp32 CPU inference, oneDNN on pre-packed weights
(fastbert/cpu/onednn_linear.py), which refuses calls that autograd records.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert.backend import REGISTRY, runs_anywhere
from fastbert.cpu import machine, onednn_linear
from fastbert.ops._dispatch import implementation
from fastbert.registry import Implementation, Signature

# activation -> F.gelu's `approximate`
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
# bias_gelu's / F.gelu's `approximate` -> activation
GELU_ACTIVATION = {approximate: activation for activation, approximate in ACTIVATIONS.items()}


def linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Reference: F.linear, then GELU if asked. The fallback and the test oracle."""
    y = F.linear(x, weight, bias)
    return y if activation is None else F.gelu(y, approximate=ACTIVATIONS[activation])


def _refuse_autograd(signature: Signature) -> str | None:
    return "the packed oneDNN GEMM has no backward (autograd is recording)" if signature.grad else None


def bind(run, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None):
    """x -> activation(x @ weight.T + bias) on `run` (the torch reference: torch's own linear, no Python frame)."""
    if run is linear_ref and activation is None:
        return functools.partial(torch._C._nn.linear, weight=weight, bias=bias)
    return lambda x: run(x, weight, bias, activation)


REGISTRY.register(Implementation(
    op="linear", backend="torch", target="fastbert.ops.linear:linear_ref", devices=None, dtypes=None,
    probe=runs_anywhere, binder="fastbert.ops.linear:bind",
))
REGISTRY.register(Implementation(
    op="linear", backend="onednn", target="fastbert.cpu.onednn_linear:linear_onednn",
    devices=frozenset({"cpu"}), dtypes=onednn_linear.DTYPES,
    probe=onednn_linear.problem, supports=_refuse_autograd, binder="fastbert.cpu.onednn_linear:bind",
    note="fastbert.cpu.onednn_linear:binding_note",
))


def _records_autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return backend.records_autograd(x, weight, bias)


def _check_arguments(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out, {x.shape[-1]}) for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_implementation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The callable that runs linear on these tensors under the current backend selection."""
    return implementation("linear", x, grad=_records_autograd(x, weight, bias))


def splits_bias(linear_backend: str, fused_backend: str) -> bool:
    """Whether a dense layer's bias goes to the fused op after its GEMM (add_layer_norm's x_bias, bias_gelu's
    bias) rather than into the GEMM. The one rule both forwards follow: a GEMM library that adds the bias in its
    epilogue keeps it (any linear backend but the torch reference), and so does torch's addmm when the fused op
    is the torch reference itself (free there); otherwise the fused kernel adds it in the pass it makes anyway."""
    return linear_backend == "torch" and fused_backend != "torch"


def fuses_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when linear runs these tensors on a GEMM library that applies bias and GELU itself (oneDNN),
    so callers should hand it the bias and activation rather than split them into a fused op after it."""
    return linear_implementation(x, weight, bias) is not linear_ref


def fuses_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when the FFN-in GELU goes into the GEMM's epilogue: `fuses_epilogue`, on a CPU whose machine record
    says the library's GELU beats fastbert's bias_gelu after the GEMM (`gelu_epilogue`). Under torch.compile the
    op runs plain F.linear and F.gelu for the compiler to fuse, and the record (cached Python state) is not traced."""
    return fuses_epilogue(x, weight, bias) and (torch.compiler.is_compiling() or gelu_epilogue_pays())


def gelu_epilogue_pays() -> bool:
    """The machine record's gelu_epilogue row: the one answer both executors (live and bound) ask."""
    return machine.choice("gelu_epilogue")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str | None = None
) -> torch.Tensor:
    """activation(x @ weight.T + bias) on the implementation the registry picks for this call."""
    _check_arguments(x, weight, bias, activation)
    return linear_implementation(x, weight, bias)(x, weight, bias, activation)
