"""Triton add + LayerNorm: y = LayerNorm(dropout(x + x_bias) + residual), forward and backward.

Tensors are viewed as (rows, width) row-major, one row held whole in registers
(width <= LAYER_NORM_MAX_WIDTH in kernels/limits.py).
Forward: one program per row; mean and rstd are saved in fp32. Dropout keeps an element when
tl.rand(seed, flat offset) >= p, the seed drawn on the host; the backward regenerates the mask from the
seed and recomputes the pre-norm sum from (x, x_bias, residual), so neither mask nor sum is stored.
Backward: each program loops over a contiguous run of rows and keeps grad_weight / grad_bias /
grad_x_bias column sums in registers, writing one fp32 partial row each; the host sums the partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels._common import as_rows, cast_for_store, optional_grad, row_blocks
from fastbert.kernels.host import draw_seed, seed_value
from fastbert.kernels.limits import layer_norm_width_problem

NUM_STAGES = 1


@triton.jit
def _pre_norm(X, RES, XB, row, cols, N, dropout_p, seed,
              HAS_RESIDUAL: tl.constexpr, HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    # h = dropout(x + x_bias) + residual for one row in fp32; also offsets, bounds mask and the
    # per-element dropout factor (0 or 1/(1-p)), identical in forward and backward.
    mask = cols < N
    offsets = tl.cast(row, tl.int64) * N + cols
    h = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        h += tl.load(XB + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_DROPOUT:
        scale = tl.where(tl.rand(seed, offsets) >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
        h *= scale
    if HAS_RESIDUAL:
        h += tl.load(RES + offsets, mask=mask, other=0.0).to(tl.float32)
    return h, offsets, mask, scale


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,  # (M, N) input
    RES,  # (M, N) residual, unused unless HAS_RESIDUAL
    W,  # (N,) LayerNorm weight
    B,  # (N,) LayerNorm bias, unused unless HAS_BIAS
    XB,  # (N,) bias added to x before dropout, unused unless HAS_X_BIAS
    Y,  # (M, N) output, x's dtype
    MEAN,  # (M,) fp32 row means, saved for backward
    RSTD,  # (M,) fp32 row 1/sqrt(var + eps), saved for backward
    N, eps, dropout_p, seed,  # width, LayerNorm eps, dropout probability, Philox seed
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    # One row per program: the pre-norm sum in fp32.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    h, offsets, mask, _ = _pre_norm(X, RES, XB, row, cols, N, dropout_p, seed,
                                    HAS_RESIDUAL, HAS_X_BIAS, HAS_DROPOUT)
    # Statistics in fp32 (two-pass variance), saved for backward.
    mean = tl.sum(h, axis=0) / N
    centered = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    # Normalize, scale, shift.
    y = centered * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, cast_for_store(y, Y), mask=mask)


def _launch_config(width: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a width: the whole row, about 8 elements per thread; the backward at
    4096 (three column-sum accumulators on top of the row) takes 32 warps to avoid spills."""
    problem = layer_norm_width_problem(width)
    if problem is not None:
        raise ValueError(f"Triton add_layer_norm: {problem}")
    block_n = triton.next_power_of_2(width)
    return block_n, min(max(block_n // (128 if backward and block_n >= 4096 else 256), 1), 32)


def _flags(residual, has_bias: bool, x_bias, dropout_p) -> dict:
    return {"HAS_RESIDUAL": residual is not None, "HAS_BIAS": has_bias,
            "HAS_X_BIAS": x_bias is not None, "HAS_DROPOUT": dropout_p > 0.0}


def add_layer_norm_fwd(x, residual, weight, bias, eps, x_bias, dropout_p, seed):
    """Launch the forward kernel; returns (y with x's shape and dtype, mean (rows,), rstd (rows,))."""
    x2 = as_rows(x)
    rows, width = x2.shape
    res2 = as_rows(residual) if residual is not None else x2
    y = torch.empty_like(x2)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    block_n, num_warps = _launch_config(width)
    _add_layer_norm_fwd_kernel[(rows,)](
        x2, res2, weight, bias if bias is not None else weight, x_bias if x_bias is not None else weight,
        y, mean, rstd, width, eps, dropout_p, seed_value(seed),
        BLOCK_N=block_n, **_flags(residual, bias is not None, x_bias, dropout_p),
        num_warps=num_warps, num_stages=NUM_STAGES,
    )
    return y.view(x.shape), mean, rstd


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient
    X,  # (M, N) saved input
    RES,  # (M, N) saved residual, unused unless HAS_RESIDUAL
    W,  # (N,) LayerNorm weight
    XB,  # (N,) saved x_bias, unused unless HAS_X_BIAS
    MEAN,  # (M,) fp32 saved row means
    RSTD,  # (M,) fp32 saved row rstd
    DX,  # (M, N) grad of x, x's dtype
    DRES,  # (M, N) grad of residual, written only with HAS_RESIDUAL and HAS_DROPOUT (else it equals DX)
    DW_PART,  # (programs, N) fp32 partial column sums for grad_weight
    DB_PART,  # (programs, N) fp32 partial column sums for grad_bias, unused unless HAS_BIAS
    DXB_PART,  # (programs, N) fp32 partial column sums for grad_x_bias, unused unless HAS_X_BIAS
    M, N, rows_per_program, dropout_p, seed,  # rows, width, rows per program, dropout p, Philox seed
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    # This program's run of rows; column-sum accumulators live in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dxb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_end = tl.minimum(pid * rows_per_program + rows_per_program, M)
    for row in range(pid * rows_per_program, row_end):
        # Recompute the normalized row from the saved inputs, statistics and dropout seed.
        h, offsets, mask, scale = _pre_norm(X, RES, XB, row, cols, N, dropout_p, seed,
                                            HAS_RESIDUAL, HAS_X_BIAS, HAS_DROPOUT)
        x_hat = tl.where(mask, (h - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        # Parameter-gradient partial sums.
        dw += dy * x_hat
        if HAS_BIAS:
            db += dy
        # Gradient of the pre-norm sum: rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * w.
        g = dy * w
        dh = (g - (x_hat * (tl.sum(g * x_hat, axis=0) / N) + tl.sum(g, axis=0) / N)) * tl.load(RSTD + row)
        # The residual gets dh; x (and x_bias) get dh through the dropout mask.
        if HAS_DROPOUT and HAS_RESIDUAL:
            tl.store(DRES + offsets, cast_for_store(dh, DRES), mask=mask)
        dx = dh * scale
        tl.store(DX + offsets, cast_for_store(dx, DX), mask=mask)
        if HAS_X_BIAS:
            dxb += dx
    # One partial row per program.
    partial = pid * N + cols
    tl.store(DW_PART + partial, dw, mask=cols < N)
    if HAS_BIAS:
        tl.store(DB_PART + partial, db, mask=cols < N)
    if HAS_X_BIAS:
        tl.store(DXB_PART + partial, dxb, mask=cols < N)


def add_layer_norm_bwd(grad, x, residual, weight, has_bias, x_bias, mean, rstd, dropout_p, seed):
    """Launch the backward kernel; returns (grad_x, grad_residual, grad_weight, grad_bias, grad_x_bias)
    in fp32 for the vectors, with empty tensors where an input is absent. Without dropout the residual
    gradient equals grad_x: grad_residual is then empty and the caller reuses grad_x."""
    x2, dy = as_rows(x), as_rows(grad)
    rows, width = x2.shape
    flags = _flags(residual, has_bias, x_bias, dropout_p)
    res2 = as_rows(residual) if residual is not None else x2
    dx = torch.empty_like(x2)
    dres = torch.empty_like(res2) if flags["HAS_RESIDUAL"] and flags["HAS_DROPOUT"] else x.new_empty(0)
    programs, rows_per_program = row_blocks(rows, x.device)
    dw_part, db_part, dxb_part = (
        torch.empty((programs, width) if wanted else (0,), device=x.device, dtype=torch.float32)
        for wanted in (True, has_bias, x_bias is not None))
    block_n, num_warps = _launch_config(width, backward=True)
    _add_layer_norm_bwd_kernel[(programs,)](
        dy, x2, res2, weight, x_bias if x_bias is not None else weight, mean, rstd,
        dx, dres, dw_part, db_part, dxb_part,
        rows, width, rows_per_program, dropout_p, seed_value(seed),
        BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=NUM_STAGES,
    )
    dres = dres.view(x.shape) if dres.numel() else dres
    return (dx.view(x.shape), dres, *(part.sum(0) if part.numel() else part for part in (dw_part, db_part, dxb_part)))


# torch.library registration: opaque ops with fake implementations, so torch.compile traces through
# them without graph breaks, and autograd through register_autograd.
@torch.library.custom_op("fastbert::triton_add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd_op(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float, x_bias: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_fwd(x, residual, weight, bias, eps, x_bias, dropout_p, seed)


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, x_bias, dropout_p, seed):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("fastbert::triton_add_layer_norm_bwd", mutates_args=())
def _add_layer_norm_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
    has_bias: bool, x_bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
    dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_layer_norm_bwd(grad, x, residual, weight, has_bias, x_bias, mean, rstd, dropout_p, seed)


@_add_layer_norm_bwd_op.register_fake
def _(grad, x, residual, weight, has_bias, x_bias, mean, rstd, dropout_p, seed):
    width = x.shape[-1]
    vector = x.new_empty(width, dtype=torch.float32)
    empty = x.new_empty(0, dtype=torch.float32)
    split_residual = residual is not None and dropout_p > 0.0
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(residual, memory_format=torch.contiguous_format) if split_residual else x.new_empty(0),
            vector, torch.empty_like(vector) if has_bias else empty,
            torch.empty_like(vector) if x_bias is not None else empty)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, x_bias, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, x_bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, residual, weight, bias, x_bias, mean, rstd, seed = ctx.saved_tensors
    dx, dres, dw, db, dxb = _add_layer_norm_bwd_op(
        grad, x, residual, weight, bias is not None, x_bias, mean, rstd, ctx.dropout_p, seed)
    # Without dropout d(loss)/d(residual) is exactly dx: reuse it.
    dres = optional_grad(residual, dres if ctx.dropout_p > 0.0 else dx)
    return (dx, dres, dw.to(weight.dtype), optional_grad(bias, db), None,
            optional_grad(x_bias, dxb), None, None)


_add_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def add_layer_norm_triton(x, residual, weight, bias, eps, *, x_bias=None, dropout_p=0.0):
    """Differentiable LayerNorm(dropout(x + x_bias) + residual) on the Triton kernels (the "triton"
    backend of fastbert.ops.add_layer_norm). The dropout seed comes from torch's default generator."""
    seed = draw_seed() if dropout_p > 0.0 else None
    y, _, _ = _add_layer_norm_fwd_op(x, residual, weight, bias, float(eps), x_bias, float(dropout_p), seed)
    return y


def _signatures(type_name: str) -> tuple[dict, dict]:
    """(forward, backward) kernel signatures with every tensor in type_name (statistics fp32)."""
    t = f"*{type_name}"
    fwd = {"X": t, "RES": t, "W": t, "B": t, "XB": t, "Y": t, "MEAN": "*fp32",
           "RSTD": "*fp32", "N": "i32", "eps": "fp32", "dropout_p": "fp32", "seed": "i32"}
    bwd = {"DY": t, "X": t, "RES": t, "W": t, "XB": t, "MEAN": "*fp32", "RSTD": "*fp32",
           "DX": t, "DRES": t, "DW_PART": "*fp32", "DB_PART": "*fp32", "DXB_PART": "*fp32",
           "M": "i32", "N": "i32", "rows_per_program": "i32", "dropout_p": "fp32", "seed": "i32"}
    return fwd, bwd


def _aot_cases() -> list[tuple]:
    """Every launch config (BLOCK_N, num_warps) for the hidden sizes up to LAYER_NORM_MAX_WIDTH with every flag on
    (the heaviest variant) in bf16, plus fp32 / fp16 and the flag-free variant at BERT's 768."""
    all_on = {"HAS_RESIDUAL": True, "HAS_BIAS": True, "HAS_X_BIAS": True, "HAS_DROPOUT": True}
    all_off = dict.fromkeys(all_on, False)
    variants = [("bf16", width, all_on) for width in (128, 384, 768, 1024, 2048, 4096)]
    variants += [("fp32", 768, all_on), ("fp16", 768, all_on), ("bf16", 768, all_off)]
    cases = []
    for type_name, width, flags in variants:
        fwd_sig, bwd_sig = _signatures(type_name)
        for name, kernel, signature, backward in (("add_layer_norm_fwd", _add_layer_norm_fwd_kernel, fwd_sig, False),
                                                   ("add_layer_norm_bwd", _add_layer_norm_bwd_kernel, bwd_sig, True)):
            block_n, num_warps = _launch_config(width, backward)
            cases.append((name, kernel, signature, {"BLOCK_N": block_n, **flags}, num_warps, NUM_STAGES))
    return cases


AOT_CASES = _aot_cases()

