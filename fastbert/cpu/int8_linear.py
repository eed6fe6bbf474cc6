"""int8 linear for CPU inference: weights int8 per output channel, activations int8 per token (dynamic).

y = act((round(x / s_x) @ round(W / s_w)^T) * s_x * s_w + b), with s_x = max|x[token, :]| / 127 per token
(computed on every call, from the call's own activations) and s_w = max|W[channel, :]| / 127 per output
channel (once, when the layer is quantized). Symmetric: no zero points in the arithmetic.

The fast path, on CPU when fastbert._C and torch's oneDNN int8 ops are there:
  1. fastbert._C quantize_rows_int8: per-token scales and int8 rows, one pass over x. On a CPU without
     AMX-INT8 the rows go to oneDNN as uint8 with zero point 128 (the same integers, shifted): its VNNI
     GEMMs take u8 x s8, and given s8 x s8 oneDNN 3.x falls back to its reference loop, ~1000x slower
     (docs/perf-notes.md, "int8 on a CPU without AMX");
  2. torch.ops.onednn.qlinear_pointwise: the int8 GEMM (VNNI / AMX), the weight scales applied in its
     epilogue, fp32 out;
  3. fastbert._C dequantize_rows: times the token scales, plus the bias (and GELU if asked), out in x's
     dtype, one pass.
The oneDNN ops are private torch ops: `problem()` says why they cannot run, and `int8_linear` then runs
the reference (`int8_linear_ref`), which computes the same integer products with torch matmuls.
Inference only: nothing here has a backward.

Inside `shared_input_quantization()` (opened per encoder layer by fastbert.quantize's hooks), a call
whose input is the very tensor the previous call quantized (same object, same version counter) reuses
its int8 rows and scales: the query, key and value projections quantize their shared input once. The
scope is what makes this safe for inference tensors (no version counter): nothing changes a layer's
input in place between its three projections.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F

GELU_CODES = {None: -1, "gelu": 0, "gelu_tanh": 1}  # activation -> fastbert._C code (kGeluErf, kGeluTanh)
_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}
DTYPES = (torch.float32, torch.bfloat16)
QMAX = 127.0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output channel): symmetric, round half to even, zero rows get scale 1."""
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return torch.round(weight / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8), scale


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 scale per row) of a 2-D x: the per-token quantization, in torch ops."""
    x = x.float()
    amax = x.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    inverse = torch.full_like(amax, QMAX) / torch.where(amax > 0, amax, torch.full_like(amax, QMAX))  # as the kernel
    q = torch.round(x * inverse[:, None])
    return q.clamp(-QMAX, QMAX).to(torch.int8), scale


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return y if activation is None else F.gelu(y, approximate=_GELU_APPROXIMATE[activation])


def int8_linear_ref(x, weight_int8, weight_scale, bias=None, activation=None):
    """Reference: the same integer products in fp64 (exact), then the scales, bias and activation.
    x: (..., in) fp32/bf16/fp64; returns x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    q, scale = quantize_rows_ref(rows)
    acc = q.double() @ weight_int8.double().T
    y = acc * scale.double()[:, None] * weight_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return _activate(y, activation).to(x.dtype).reshape(*x.shape[:-1], weight_int8.shape[0])


@functools.lru_cache(maxsize=None)
def problem() -> str | None:
    """Why the fast int8 path cannot run in this process; None if it can (checked once, on a tiny GEMM)."""
    from fastbert import extension

    reason = extension.load_problem()
    if reason is not None:
        return reason
    if not hasattr(extension.module(), "quantize_rows_int8"):
        return "fastbert._C predates the int8 kernels (rebuild the extension)"
    if not vnni_present():
        return ("this CPU has no VNNI (avx512_vnni, avx_vnni or amx_int8): oneDNN's uint8 x int8 GEMM saturates "
                "its 16-bit pair sums there")
    for name in ("qlinear_prepack", "qlinear_pointwise"):
        if not hasattr(torch.ops.onednn, name):
            return f"torch {torch.__version__} has no torch.ops.onednn.{name} (private op)"
    try:
        weight, scale = quantize_weight(torch.randn(8, 16))
        x = torch.randn(3, 16)
        got = _int8_linear_onednn(x, prepack(weight), scale, torch.zeros(8), None)
        expected = int8_linear_ref(x, weight, scale, torch.zeros(8))
    except RuntimeError as error:  # the op exists but oneDNN int8 does not run here
        return f"torch.ops.onednn.qlinear_pointwise failed: {error}"
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        return "torch.ops.onednn.qlinear_pointwise disagrees with the reference on a probe GEMM"
    return None


def vnni_present() -> bool:
    """An int8 dot-product instruction that accumulates in 32 bits (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    from fastbert.cpu import machine

    return machine.choice("int8_gemm")


def prepack(weight_int8: torch.Tensor) -> torch.Tensor:
    """The int8 weight in oneDNN's blocked layout (private op; callers check problem() first)."""
    return torch.ops.onednn.qlinear_prepack(weight_int8, None)


def packed_or_none(weight_int8: torch.Tensor) -> torch.Tensor | None:
    """prepack(weight_int8) where the fast path runs it (a CPU weight, problem() None); else None, which
    makes int8_linear run the reference."""
    if weight_int8.device.type != "cpu" or problem() is not None:
        return None
    return prepack(weight_int8)


def _int8_linear_onednn(x, packed_weight, weight_scale, bias, activation):
    from fastbert import extension

    kernels = extension.module()
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    tokens, width = rows.shape
    out_features = weight_scale.shape[0]
    y = torch.empty(tokens, out_features, dtype=x.dtype)
    if tokens == 0:
        return y.reshape(*x.shape[:-1], out_features)
    code = kernels.FLOAT32 if x.dtype == torch.float32 else kernels.BFLOAT16
    threads = torch.get_num_threads()
    q, token_scale = _quantized_input(x, rows, kernels, code, threads)
    zero_points = _zero_points(out_features)
    acc = torch.ops.onednn.qlinear_pointwise(
        q, 1.0, activation_zero_point(), packed_weight, weight_scale, zero_points, None, 1.0, 0, torch.float32, "none",
        [], ""
    )
    kernels.dequantize_rows(acc.data_ptr(), token_scale.data_ptr(), bias.data_ptr(), y.data_ptr(), tokens,
                            out_features, code, GELU_CODES[activation], threads)
    return y.reshape(*x.shape[:-1], out_features)


class _Shared(threading.local):
    depth = 0
    last: tuple | None = None  # (input tensor, its version or None, int8 rows, scales)


_shared = _Shared()


@contextlib.contextmanager
def shared_input_quantization():
    """Within this scope (per thread), consecutive int8 linears on the same input tensor quantize it once."""
    enter_shared_scope()
    try:
        yield
    finally:
        exit_shared_scope()


def enter_shared_scope() -> None:
    _shared.depth += 1


def exit_shared_scope() -> None:
    _shared.depth -= 1
    if _shared.depth <= 0:
        _shared.depth, _shared.last = 0, None


def _quantized_input(x, rows, kernels, code, threads):
    version = None if x.is_inference() else x._version
    last = _shared.last
    if last is not None and last[0] is x and last[1] == version:
        return last[2], last[3]
    tokens, width = rows.shape
    zero_point = activation_zero_point()
    q = torch.empty(tokens, width, dtype=torch.uint8 if zero_point else torch.int8)
    token_scale = torch.empty(tokens, dtype=torch.float32)
    kernels.quantize_rows_int8(rows.data_ptr(), q.data_ptr(), token_scale.data_ptr(), tokens, width, code, zero_point,
                               threads)
    if _shared.depth > 0:
        _shared.last = (x, version, q, token_scale)
    return q, token_scale


def activation_zero_point() -> int:
    """How the int8 activations go to oneDNN: 0 (int8) on a CPU with AMX-INT8, where oneDNN's s8 x s8 GEMM runs
    on AMX; else 128 (uint8 = int8 + 128), the u8 x s8 form of its VNNI GEMMs (given s8 x s8 there, oneDNN runs
    its reference loop)."""
    from fastbert.cpu import machine

    return machine.choice("int8_zero_point")


@functools.lru_cache(maxsize=64)
def _zero_points(out_features: int) -> torch.Tensor:
    return torch.zeros(out_features, dtype=torch.long)


def int8_linear(x, weight_int8, weight_scale, bias, activation=None, packed_weight=None):
    """activation(x @ W^T + b) with W = weight_int8 * weight_scale (per output channel) and x quantized per
    token. bias: fp32 (out,) or None. The oneDNN path when it can run these tensors (CPU, fp32/bf16, a
    packed weight given, no autograd recording), else the reference."""
    if activation not in GELU_CODES:
        raise ValueError(f"activation must be None or one of {tuple(GELU_CODES)[1:]}, got {activation!r}")
    fast = (packed_weight is not None and x.device.type == "cpu" and x.dtype in DTYPES and problem() is None
            and not torch.compiler.is_compiling())
    if not fast:
        return int8_linear_ref(x, weight_int8, weight_scale, bias, activation)
    if bias is None:
        bias = _zeros(weight_scale.shape[0])
    return _int8_linear_onednn(x, packed_weight, weight_scale, bias.float().contiguous(), activation)


def int8_linear_packed(x, weight_int8, weight_scale, bias, activation=None, packed_weight=None):
    """The registry's "onednn" int8_linear (fastbert/ops/int8_linear.py): int8_linear on the packed weight, packed
    here when the caller holds none."""
    if packed_weight is None:
        packed_weight = prepack(weight_int8)
    return int8_linear(x, weight_int8, weight_scale, bias, activation, packed_weight)


@functools.lru_cache(maxsize=64)
def _zeros(width: int) -> torch.Tensor:
    return torch.zeros(width, dtype=torch.float32)
