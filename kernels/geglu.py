"""Triton GeGLU: y = GELU(a) * g with x = [a | g] along the last dim, forward and backward, fp32 math.

x is viewed as (rows, 2n) row-major, y as (rows, n). Each program owns a tile of BLOCK_M rows x
BLOCK_N columns of y and reads the matching columns of a and g. The backward recomputes GELU(a) and
its slope from x instead of saving them: dA = dy * g * GELU'(a), dG = dy * GELU(a).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels._common import TRITON_TYPES, as_rows, cast_for_store
from fastbert.kernels.bias_gelu import _blocks, _gelu_and_grad

NUM_WARPS = 4
NUM_STAGES = 1


@triton.jit
def _load_halves(X, rows, cols, M, N):
    # (a, g) tiles of x in fp32, the offsets of a in x, and the bounds mask.
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None].to(tl.int64) * (2 * N) + cols[None, :]
    a = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + offsets + N, mask=mask, other=0.0).to(tl.float32)
    return a, g, offsets, mask


@triton.jit
def _geglu_fwd_kernel(
    X,  # (M, 2N) input: [a | g]
    Y,  # (M, N) output, x's dtype
    M, N,  # rows, output width
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_TANH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    a, g, _, mask = _load_halves(X, rows, cols, M, N)
    gelu, _ = _gelu_and_grad(a, IS_TANH)
    y_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(Y + y_offsets, cast_for_store(gelu * g, Y), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    DY,  # (M, N) upstream gradient
    X,  # (M, 2N) saved input
    DX,  # (M, 2N) grad of x: [dA | dG], x's dtype
    M, N,  # rows, output width
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_TANH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    a, g, offsets, mask = _load_halves(X, rows, cols, M, N)
    dy = tl.load(DY + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gelu, slope = _gelu_and_grad(a, IS_TANH)
    tl.store(DX + offsets, cast_for_store(dy * g * slope, DX), mask=mask)
    tl.store(DX + offsets + N, cast_for_store(dy * gelu, DX), mask=mask)


def _grid(rows: int, width: int):
    block_m, block_n = _blocks(width)
    return (triton.cdiv(rows, block_m), triton.cdiv(width, block_n)), block_m, block_n


def geglu_fwd(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Launch the forward; returns GELU(a) * g with x's leading shape, half its last dim."""
    x2 = as_rows(x)
    rows, width = x2.shape[0], x2.shape[1] // 2
    y = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    grid, block_m, block_n = _grid(rows, width)
    if rows and width:
        _geglu_fwd_kernel[grid](x2, y, rows, width, BLOCK_M=block_m, BLOCK_N=block_n,
                                IS_TANH=approximate == "tanh", num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y.view(*x.shape[:-1], width)


def geglu_bwd(grad: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Launch the backward; returns grad_x with x's shape."""
    x2, dy = as_rows(x), as_rows(grad)
    rows, width = x2.shape[0], x2.shape[1] // 2
    dx = torch.empty_like(x2)
    grid, block_m, block_n = _grid(rows, width)
    if rows and width:
        _geglu_bwd_kernel[grid](dy, x2, dx, rows, width, BLOCK_M=block_m, BLOCK_N=block_n,
                                IS_TANH=approximate == "tanh", num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dx.view(x.shape)


@torch.library.custom_op("fastbert::triton_geglu_fwd", mutates_args=())
def _geglu_fwd_op(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return geglu_fwd(x, approximate)


@_geglu_fwd_op.register_fake
def _(x, approximate):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("fastbert::triton_geglu_bwd", mutates_args=())
def _geglu_bwd_op(grad: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    return geglu_bwd(grad, x, approximate)


@_geglu_bwd_op.register_fake
def _(grad, x, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _geglu_bwd_op(grad, x, ctx.approximate), None


_geglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def geglu_triton(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Differentiable GELU(a) * g on the Triton kernels (the "triton" backend of fastbert.ops.geglu)."""
    return _geglu_fwd_op(x, approximate)


def _aot_cases() -> list[tuple]:
    """Each dtype at ModernBERT-base's width (1152: the widest tile) with exact GELU, bf16 with tanh,
    and a narrow tile."""
    variants = [(type_name, False, 1152) for type_name in TRITON_TYPES.values()]
    variants += [("bf16", True, 1152), ("fp32", False, 16)]
    cases = []
    for type_name, is_tanh, width in variants:
        block_m, block_n = _blocks(width)
        flags = {"BLOCK_M": block_m, "BLOCK_N": block_n, "IS_TANH": is_tanh}
        fwd_sig = {"X": f"*{type_name}", "Y": f"*{type_name}", "M": "i32", "N": "i32"}
        bwd_sig = {"DY": f"*{type_name}", "X": f"*{type_name}", "DX": f"*{type_name}", "M": "i32", "N": "i32"}
        cases.append(("geglu_fwd", _geglu_fwd_kernel, fwd_sig, flags, NUM_WARPS, NUM_STAGES))
        cases.append(("geglu_bwd", _geglu_bwd_kernel, bwd_sig, flags, NUM_WARPS, NUM_STAGES))
    return cases


AOT_CASES = _aot_cases()
