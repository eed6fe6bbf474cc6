"""CPU inference GEMMs on oneDNN with pre-packed weights, and the cache that holds the packed copies.

torch's fp32 F.linear goes to MKL; oneDNN on a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, then `torch.ops.mkldnn._linear_pointwise`) is faster
on this project's CPUs (docs/perf-notes.md), and it applies GELU (erf or tanh) as an epilogue.

These are private torch ops: `problem()` says why they cannot run (absent in this torch build,
oneDNN off, packing switched off) and the registry then falls back to the torch reference.

Packed weights live in a process-wide cache keyed on the weight tensor's identity (weakly: an entry
dies with its weight) and checked against the weight's version counter and storage address, so a
replaced or changed parameter is repacked on its next use. The cache is not module state: it never
appears in state_dict, deepcopy or pickles. It costs one extra copy of every packed weight
(`cache_bytes()`); `set_packing(False)` (or FASTBERT_PACKED_WEIGHTS=0) turns the path off and
empties the cache. Inference only: the packed GEMM has no backward, so the registration refuses
calls that autograd records.

Precision: fp32, and bf16 where oneDNN runs it (`DTYPES`). Under `torch.autocast("cpu", torch.bfloat16)`
an fp32 call runs as F.linear would there: input and weight in bf16 (the weight packed once, in its own
cache entry), bf16 output; the bias stays fp32 (oneDNN adds it to the fp32 accumulator). Other autocast dtypes run
the torch reference, which applies autocast itself, so autocast is never silently ignored.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fastbert.cpu import few_rows_linear, machine, onednn_row_blocks, weight_cache
from fastbert.cpu.weight_cache import PackedWeights, packing_enabled

# activation name -> (oneDNN post-op attribute, its algorithm)
# ("tanh": the plan's BertPooler; the linear op itself takes None and the two GELUs)
POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "tanh": ("tanh", "")}
_REQUIRED_OPS = ("_reorder_linear_weight", "_linear_pointwise")


def bf16_problem() -> str | None:
    """Why oneDNN's bf16 GEMM cannot run on this CPU; None if it can. It needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT; elsewhere (an AVX2-only CPU) its weight reorder raises, so bf16 stays on F.linear."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:
        return f"torch {torch.__version__} has no torch.ops.mkldnn._is_mkldnn_bf16_supported (private op)"
    if not check():
        return "oneDNN's bf16 GEMM needs AVX512-BW/VL/DQ or AVX-NE-CONVERT, which this CPU lacks"
    return None


# the dtypes the packed GEMM runs here (as the input's dtype, or as the CPU autocast dtype); checked once
DTYPES = frozenset({torch.float32, torch.bfloat16} if bf16_problem() is None else {torch.float32})

# Packed copies, per (weight, dtype packed in)
_cache = PackedWeights()


def mkldnn_problem() -> str | None:
    """Why this torch cannot run packed oneDNN linears; None if it can."""
    if not getattr(torch._C, "_has_mkldnn", False) or not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    missing = [name for name in _REQUIRED_OPS if not hasattr(torch.ops.mkldnn, name)]
    if missing:
        names = ", ".join(f"torch.ops.mkldnn.{name}" for name in missing)
        return f"torch {torch.__version__} has no {names} (private ops)"
    return None


def problem(device: str) -> str | None:
    """The registry probe: None if packed oneDNN linears can run on `device`, else why not."""
    if device != "cpu":
        return f"oneDNN packed linears run on CPU tensors, got {device}"
    if not packing_enabled():
        return "packed oneDNN weights are switched off (FASTBERT_PACKED_WEIGHTS=0 or onednn_linear.set_packing(False))"
    return mkldnn_problem()


def set_packing(enabled: bool) -> None:
    """Turn the packed-weight path on or off for the process; off also frees every packed copy."""
    weight_cache.set_packing_flag(enabled)
    clear_cache()
    from fastbert.backend import REGISTRY

    REGISTRY.clear_cache()  # resolution is memoized; the probe's answer just changed


def clear_cache() -> None:
    """Free every packed copy: oneDNN's and the few-rows kernels' (few_rows_linear)."""
    _cache.clear()
    few_rows_linear.clear_cache()


def cache_bytes() -> int:
    """Memory held by packed weights now (the size of the weights they copy, in the packed dtype): oneDNN's and
    the few-rows kernels' copies."""
    return _cache.nbytes() + few_rows_linear.cache_bytes()


def packed_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight (cast to `dtype`, default its own) reordered for oneDNN, from the cache while the weight is
    the same tensor, unchanged."""
    dtype = weight.dtype if dtype is None else dtype
    return _cache.get(weight, dtype, lambda w: torch.ops.mkldnn._reorder_linear_weight(w.to(dtype)))


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the GEMM runs in: the CPU autocast dtype when autocast is on, else x's dtype when the
    weight has it too; None when the packed path does not run it (the torch reference then does)."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    else:
        dtype = x.dtype if weight.dtype == x.dtype else None
    return dtype if dtype in DTYPES else None


def _reference(x, weight, bias, activation=None):
    """F.linear (MKL on CPU), then the activation: the calls oneDNN does not run here."""
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return torch.tanh(y) if activation == "tanh" else F.gelu(y, approximate=POST_OPS[activation][1])


def fp32_max_rows() -> float:
    """The most rows an fp32 call runs on oneDNN here; more go to F.linear (machine record)."""
    return machine.choice("onednn_fp32_max_rows")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _torch_above(gemm, most: float, weight, bias, activation):
    """x -> gemm(x) up to `most` rows, else F.linear and the activation."""
    def run(x: torch.Tensor) -> torch.Tensor:
        return gemm(x) if _rows(x) <= most else _reference(x, weight, bias, activation)

    return run


class BuiltOnFirstCall:
    """x -> build()(x), with build() run on the first call only: a plan whose GEMMs only ever see few rows
    never makes oneDNN's packed copy of their weights (half the packed memory of a latency deployment).
    Two threads that build at once each build one (the packed-weight cache makes both the same copy)."""

    __slots__ = ("build", "run")

    def __init__(self, build):
        self.build, self.run = build, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        run = self.run
        if run is None:
            run = self.run = self.build()
        return run(x)


def bind(run, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None):
    """The binder (registry.Implementation.binder) of the packed CPU GEMM, for inference plans: x ->
    activation(x @ weight.T + bias) in the weight's dtype. Calls of at most few_rows_linear.max_rows rows run
    fastbert's few-rows kernels where this CPU has one; larger calls oneDNN's packed GEMM (bf16 on row blocks
    where the machine record says), whose packed copy is made only when a call first has that many rows."""
    attribute, algorithm = POST_OPS[activation]
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()  # oneDNN adds an fp32 bias to its fp32 accumulator (as linear_onednn)

    def onednn_gemm():
        packed = packed_weight(weight)
        if weight.dtype == torch.bfloat16:
            return functools.partial(onednn_row_blocks.bf16_linear, weight=packed, bias=bias, attribute=attribute,
                                     algorithm=algorithm)
        return functools.partial(torch.ops.mkldnn._linear_pointwise.default, W=packed, B=bias, attr=attribute,
                                 scalars=[], algorithm=algorithm)

    most = fp32_max_rows() if weight.dtype == torch.float32 else math.inf
    if few_rows_linear.problem(weight) is None:
        gemm = few_rows_linear.by_rows(weight, bias, activation, BuiltOnFirstCall(onednn_gemm))
    elif math.isinf(most):
        return onednn_gemm()
    else:  # oneDNN for few rows only: its packed copy is made when a call first has that few
        gemm = BuiltOnFirstCall(onednn_gemm)
    return gemm if math.isinf(most) else _torch_above(gemm, most, weight, bias, activation)


def binding_note() -> str:
    """What `bind` runs on this machine, per dtype (`fastbert info`)."""
    parts = []
    for dtype in (torch.bfloat16, torch.float32):
        problem = few_rows_linear.problem(torch.empty(16, 32, dtype=dtype))
        name = str(dtype).replace("torch.", "")
        if problem is None:
            kernel, most = few_rows_linear.kernel_name(dtype), few_rows_linear.max_rows(dtype, None)
            parts.append(f"{name} on fastbert's {kernel} kernel up to {most} rows "
                         f"({few_rows_linear.max_rows(dtype, 'gelu')} with GELU)")
        else:
            parts.append(f"{name} few-rows kernel off: {problem}")
    most = fp32_max_rows()
    above = "" if math.isinf(most) else f", float32 calls of more than {most} rows on torch's F.linear"
    return "bound: " + "; ".join(parts) + "; other calls on oneDNN's packed GEMM" + above


def linear_onednn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """activation(x @ weight.T + bias) on oneDNN with the packed weight; fp32 or bf16 (or fp32 under bf16
    autocast) CPU, no autograd."""
    dtype = compute_dtype(x, weight)
    if dtype is None or torch.compiler.is_compiling():  # the cache is Python state; let the compiler see plain ops
        return _reference(x, weight, bias, activation)
    attribute, algorithm = POST_OPS[activation]
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()  # oneDNN adds an fp32 bias to its fp32 accumulator for either input dtype
    x = x.to(dtype)
    most = few_rows_linear.max_rows(dtype, activation)
    if x.numel() <= most * x.shape[-1] and few_rows_linear.problem(weight, dtype) is None:
        return few_rows_linear.few_rows_linear(x, few_rows_linear.packed_weight(weight, dtype), bias, activation,
                                               weight.shape[0])
    if dtype == torch.bfloat16:  # on row blocks where oneDNN's bf16 GEMM would idle a thread
        return onednn_row_blocks.bf16_linear(x, packed_weight(weight, dtype), bias, attribute, algorithm)
    if _rows(x) > fp32_max_rows():
        return _reference(x, weight, bias, activation)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight, dtype), bias, attribute, [], algorithm)
