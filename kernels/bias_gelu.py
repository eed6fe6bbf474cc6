"""Triton bias + GELU: y = GELU(x + bias), forward and backward, fp32 math inside.

x is viewed as (rows, width) row-major. Each program owns a tile of BLOCK_M rows x BLOCK_N columns.
The backward recomputes the pre-activation from (x, bias) instead of saving it; its programs loop over
a contiguous run of rows and write one partial column sum each for grad_bias, summed on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels._common import TRITON_TYPES, as_rows, cast_for_store, row_blocks

SQRT_1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
TANH_CUBIC = tl.constexpr(0.044715)

TILE_ELEMENTS = 2048  # elements per program tile: 16 per thread at 4 warps
MAX_BLOCK_N = 1024
MIN_BLOCK_N = 16
NUM_WARPS = 4
NUM_STAGES = 1


@triton.jit
def _tanh(u):
    # tanh from exp, saturating to +-1 without overflow trouble (exp -> inf gives 1).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu_and_grad(z, IS_TANH: tl.constexpr):
    # GELU(z) and dGELU/dz in fp32.
    if IS_TANH:
        inner = SQRT_2_PI * (z + TANH_CUBIC * z * z * z)
        t = _tanh(inner)
        cdf = 0.5 * (1.0 + t)
        pdf_term = 0.5 * z * (1.0 - t * t) * SQRT_2_PI * (1.0 + 3.0 * TANH_CUBIC * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT_1_2))
        pdf_term = z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    return z * cdf, cdf + pdf_term


@triton.jit
def _load_pre_activation(X, B, rows, cols, M, N, HAS_BIAS: tl.constexpr):
    # z = x + bias for a (BLOCK_M, BLOCK_N) tile in fp32, with its flat offsets and bounds mask.
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return z, offsets, mask


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N) input
    B,  # (N,) bias, unused unless HAS_BIAS
    Y,  # (M, N) output, x's dtype
    M, N,  # rows, width
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_TANH: tl.constexpr,
):
    # This program's tile.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    z, offsets, mask = _load_pre_activation(X, B, rows, cols, M, N, HAS_BIAS)
    # GELU in fp32, stored in the output dtype.
    y, _ = _gelu_and_grad(z, IS_TANH)
    tl.store(Y + offsets, cast_for_store(y, Y), mask=mask)


def _blocks(width: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a width: whole rows up to MAX_BLOCK_N columns, TILE_ELEMENTS per tile."""
    block_n = min(max(triton.next_power_of_2(width), MIN_BLOCK_N), MAX_BLOCK_N)
    return TILE_ELEMENTS // block_n, block_n


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """Launch the forward kernel; returns GELU(x + bias) with x's shape and dtype."""
    x2 = as_rows(x)
    rows, width = x2.shape
    y = torch.empty_like(x2)
    block_m, block_n = _blocks(width)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(width, block_n))
    _bias_gelu_fwd_kernel[grid](
        x2, bias if bias is not None else x2, y, rows, width,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None, IS_TANH=approximate == "tanh",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return y.view(x.shape)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) upstream gradient
    X,  # (M, N) saved input
    B,  # (N,) bias, unused unless HAS_BIAS
    DX,  # (M, N) grad of x, x's dtype
    DB_PART,  # (programs, N) fp32 partial column sums of DX, unused unless HAS_BIAS
    M, N,  # rows, width
    rows_per_program,  # rows owned by each program along axis 0 (a multiple of BLOCK_M)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_TANH: tl.constexpr,
):
    # This program's columns and its run of rows.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for first_row in range(row_start, row_end, BLOCK_M):
        # Recompute the pre-activation, then dx = dy * GELU'(z).
        rows = first_row + tl.arange(0, BLOCK_M)
        z, offsets, mask = _load_pre_activation(X, B, rows, cols, row_end, N, HAS_BIAS)
        _, slope = _gelu_and_grad(z, IS_TANH)
        dx = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32) * slope
        tl.store(DX + offsets, cast_for_store(dx, DX), mask=mask)
        # Accumulate this tile's column sums for grad_bias (masked lanes hold 0).
        if HAS_BIAS:
            db += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, db, mask=cols < N)


def bias_gelu_bwd(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
    """Launch the backward kernel; returns (grad_x, grad_bias), grad_bias empty when bias is None."""
    x2, dy = as_rows(x), as_rows(grad)
    rows, width = x2.shape
    dx = torch.empty_like(x2)
    block_m, block_n = _blocks(width)
    programs, rows_per_program = row_blocks(rows, x.device, block_m)
    has_bias = bias is not None
    db_part = torch.empty((programs, width) if has_bias else (0,), device=x.device, dtype=torch.float32)
    _bias_gelu_bwd_kernel[(programs, triton.cdiv(width, block_n))](
        dy, x2, bias if has_bias else x2, dx, db_part, rows, width, rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, IS_TANH=approximate == "tanh",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    grad_bias = db_part.sum(0).to(bias.dtype) if has_bias else x.new_empty(0)
    return dx.view(x.shape), grad_bias


# torch.library registration: opaque ops with fake implementations, so torch.compile traces through
# them without graph breaks, and autograd through register_autograd.
@torch.library.custom_op("fastbert::triton_bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    return bias_gelu_fwd(x, bias, approximate)


@_bias_gelu_fwd_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastbert::triton_bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return bias_gelu_bwd(grad, x, bias, approximate)


@_bias_gelu_bwd_op.register_fake
def _(grad, x, bias, approximate):
    grad_bias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_bias


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = _bias_gelu_bwd_op(grad, x, bias, ctx.approximate)
    return grad_x, (grad_bias if bias is not None else None), None


_bias_gelu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """Differentiable GELU(x + bias) on the Triton kernels (the "triton" backend of fastbert.ops.bias_gelu)."""
    return _bias_gelu_fwd_op(x, bias, approximate)


def _aot_cases() -> list[tuple]:
    """Every (dtype, approximation) at the widest tile BERT launches (width >= 513), with bias, plus a
    narrow bias-free tile; one launch config (NUM_WARPS, NUM_STAGES) for all."""
    cases = []
    for type_name in TRITON_TYPES.values():
        for is_tanh in (False, True):
            for width in (1024, 16):
                block_m, block_n = _blocks(width)
                has_bias = width != 16
                flags = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HAS_BIAS": has_bias, "IS_TANH": is_tanh}
                fwd_sig = {"X": f"*{type_name}", "B": f"*{type_name}", "Y": f"*{type_name}", "M": "i32", "N": "i32"}
                bwd_sig = {"DY": f"*{type_name}", "X": f"*{type_name}", "B": f"*{type_name}",
                           "DX": f"*{type_name}", "DB_PART": "*fp32", "M": "i32", "N": "i32",
                           "rows_per_program": "i32"}
                cases.append(("bias_gelu_fwd", _bias_gelu_fwd_kernel, fwd_sig, flags, NUM_WARPS, NUM_STAGES))
                cases.append(("bias_gelu_bwd", _bias_gelu_bwd_kernel, bwd_sig, flags, NUM_WARPS, NUM_STAGES))
    return cases


AOT_CASES = _aot_cases()
