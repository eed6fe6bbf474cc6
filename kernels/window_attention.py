"""Triton sliding-window attention on packed tokens: forward and backward.

Query i of a sequence attends to keys j of the same sequence with |i - j| <= WINDOW. A program owns
one (query block, head, sequence) in the forward and the dq pass, one (key block, head, sequence) in
the dk/dv pass, and loops only over the blocks of the other side that meet its band: work is
O(tokens x window), not O(tokens x length). Otherwise it is kernels/attention.py's varlen path (its
helpers, numerics and dropout stream): online softmax in base 2, logsumexp saved as (heads, tokens),
backward without atomics (dq pass, then dk/dv pass).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels.attention import (
    _CONFIGS,
    LOG2E,
    _base,
    _config,
    _dot,
    _dropout_scale,
    _flags,
    _load_rows,
    _prepare,
    _same_layout,
    _sequence,
    _stat_offsets,
    _store_rows,
    _strides,
)
from fastbert.kernels.host import seed_value


@triton.jit
def _band_scores(q, k, rows, cols, length, window, qk_scale, UPCAST_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores in base 2; -inf outside the sequence or the window."""
    s = _dot(q, tl.trans(k), UPCAST_DOT) * qk_scale
    distance = rows[:, None] - cols[None, :]
    ok = (cols[None, :] < length) & (distance <= window) & (distance >= -window)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _band(first, count, length, window, BLOCK: tl.constexpr):
    """[lo, hi): the other side's rows that meet rows [first, first + count), lo aligned to BLOCK."""
    lo = tl.maximum(first - window, 0) // BLOCK * BLOCK
    hi = tl.minimum(first + count + window, length)
    return lo, hi


@triton.jit
def _window_fwd_kernel(
    Q, K, V,  # (total, heads, head_dim), strides stride_q*
    O,  # like Q, strides stride_o*
    LSE,  # (heads, total) fp32
    CU_SEQLENS,  # (batch + 1,) int32
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window,  # max_seqlen, total, heads, |i - j| limit
    qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, batch = _sequence(CU_SEQLENS, b, seqlen, True)
    if pid_m * BLOCK_M >= length:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
    seed_bh = seed + b * n_heads + h

    q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _band(pid_m * BLOCK_M, BLOCK_M, length, window, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):  # only the key blocks that meet this block's band
        cols = start_n + offs_n
        k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        s = _band_scores(q, k, rows, cols, length, window, qk_scale, UPCAST_DOT)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = p * _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT)
        m_i = m_new

    # every real query sees at least itself, so l > 0 on real rows
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    lse = (m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))) / LOG2E
    _store_rows(O + _base(batch, start, h, stride_ob, stride_ot, stride_oh), out, rows, length, stride_ot, offs_d,
                HEAD_DIM)
    tl.store(LSE + _stat_offsets(h, n_rows, batch, seqlen, start, rows), lse, mask=rows < length)


@triton.jit
def _window_bwd_dq_kernel(
    Q, K, V, O, DO, DQ,  # (total, heads, head_dim); q, k, v strides stride_q*, the others stride_o*
    LSE, DELTA,  # (heads, total) fp32; delta = rowsum(dO * O), written here
    CU_SEQLENS,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window,
    softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, batch = _sequence(CU_SEQLENS, b, seqlen, True)
    if pid_m * BLOCK_M >= length:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
    o_base = _base(batch, start, h, stride_ob, stride_ot, stride_oh)
    seed_bh = seed + b * n_heads + h
    qk_scale = softmax_scale * LOG2E

    q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
    do = _load_rows(DO + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
    o = _load_rows(O + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_rows = _stat_offsets(h, n_rows, batch, seqlen, start, rows)
    tl.store(DELTA + stat_rows, delta, mask=rows < length)
    lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _band(pid_m * BLOCK_M, BLOCK_M, length, window, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        p = tl.math.exp2(_band_scores(q, k, rows, cols, length, window, qk_scale, UPCAST_DOT) - lse2[:, None])
        dp = _dot(do, tl.trans(v), UPCAST_DOT)
        if HAS_DROPOUT:
            dp = dp * _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST_DOT)
    _store_rows(DQ + o_base, dq * softmax_scale, rows, length, stride_ot, offs_d, HEAD_DIM)


@triton.jit
def _window_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,  # (total, heads, head_dim); q, k, v strides stride_q*, the others stride_o*
    LSE, DELTA,  # (heads, total) fp32
    CU_SEQLENS,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window,
    softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, batch = _sequence(CU_SEQLENS, b, seqlen, True)
    if pid_n * BLOCK_N >= length:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
    o_base = _base(batch, start, h, stride_ob, stride_ot, stride_oh)
    seed_bh = seed + b * n_heads + h
    qk_scale = softmax_scale * LOG2E

    k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _band(pid_n * BLOCK_N, BLOCK_N, length, window, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):  # only the query blocks whose band meets these keys
        rows = start_m + offs_m
        q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
        do = _load_rows(DO + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
        stat_rows = _stat_offsets(h, n_rows, batch, seqlen, start, rows)
        lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stat_rows, mask=rows < length, other=0.0)
        p = tl.math.exp2(_band_scores(q, k, rows, cols, length, window, qk_scale, UPCAST_DOT) - lse2[:, None])
        dp = _dot(do, tl.trans(v), UPCAST_DOT)
        if HAS_DROPOUT:
            keep = _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
            p_drop = p * keep
            dp = dp * keep
        else:
            p_drop = p
        dv += _dot(tl.trans(p_drop.to(do.dtype)), do, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST_DOT)
    _store_rows(DK + o_base, dk * softmax_scale, cols, length, stride_ot, offs_d, HEAD_DIM)
    _store_rows(DV + o_base, dv, cols, length, stride_ot, offs_d, HEAD_DIM)


def _kernel_flags(q: torch.Tensor, dropout_p: float) -> dict:
    flags = _flags(q, None, None, dropout_p)
    return {name: flags[name] for name in ("HEAD_DIM", "HAS_DROPOUT", "UPCAST_DOT")}


def window_fwd(q, k, v, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed):
    """Launch the forward; returns (out like q, lse (heads, total) fp32)."""
    q, k, v = _same_layout(q, k, v)
    total, heads = q.shape[0], q.shape[1]
    batch = cu_seqlens.numel() - 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    block_d, (block_m, block_n, num_warps, num_stages), _, _ = _config(q.shape[-1])
    grid = (triton.cdiv(max_seqlen, block_m), heads, batch)
    if min(grid) == 0:
        return out, lse
    _window_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, *_strides(q, True), *_strides(out, True),
        max_seqlen, total, heads, window, softmax_scale * LOG2E.value, dropout_p, seed,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **_kernel_flags(q, dropout_p),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def window_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed):
    """Launch the backward; returns (dq, dk, dv), each (total, heads, head_dim) contiguous."""
    q, k, v = _same_layout(q, k, v)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    out, dout = (t.contiguous() for t in (out, dout))  # read with dq's strides
    delta = torch.empty_like(lse)
    batch, heads = cu_seqlens.numel() - 1, q.shape[1]
    block_d, _, dq_config, dkdv_config = _config(q.shape[-1])
    if min(batch, heads, max_seqlen) == 0:
        return dq, dk, dv
    args = (*_strides(q, True), *_strides(dq, True), max_seqlen, q.shape[0], heads, window, softmax_scale,
            dropout_p, seed)
    flags = _kernel_flags(q, dropout_p)
    block_m, block_n, num_warps, num_stages = dq_config
    _window_bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), heads, batch)](
        q, k, v, out, dout, dq, lse, delta, cu_seqlens, *args,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
    )
    block_m, block_n, num_warps, num_stages = dkdv_config
    _window_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), heads, batch)](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens, *args,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv


@torch.library.custom_op("fastbert::triton_window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, window: int,
    softmax_scale: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return window_fwd(q, k, v, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed_value(seed))


@_window_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[1], q.shape[0],
                                                                              dtype=torch.float32)


@torch.library.custom_op("fastbert::triton_window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, max_seqlen: int, window: int, softmax_scale: float, dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p,
                      seed_value(seed))


@_window_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.max_seqlen, ctx.window, ctx.softmax_scale, ctx.dropout_p = max_seqlen, window, softmax_scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _window_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.window,
                                       ctx.softmax_scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None


_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_attention_triton(q, k, v, cu_seqlens, max_seqlen, window, *, softmax_scale=None, dropout_p=0.0):
    """Sliding-window attention on packed tokens (the "triton" backend of fastbert.ops.window_attention)."""
    scale, seed = _prepare(q, softmax_scale, dropout_p)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    out, _ = _window_attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), int(window), scale, float(dropout_p), seed)
    return out


_AOT_TYPES = {
    **{name: "*DTYPE" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")},
    "LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS": "*i32", "qk_scale": "fp32", "softmax_scale": "fp32",
    "dropout_p": "fp32", "seed": "i64",
}


def _aot_cases() -> list[tuple]:
    """Each kernel with the launchers' config: bf16 head_dim 64 (ModernBERT-base) with and without
    dropout, and the heaviest variants at head_dim 128 (dropout) in fp16 and bf16."""
    kernels = (("fwd", _window_fwd_kernel), ("bwd_dq", _window_bwd_dq_kernel), ("bwd_dkdv", _window_bwd_dkdv_kernel))
    variants = [("bf16", 64, False), ("bf16", 64, True), ("fp16", 128, True), ("bf16", 128, True)]
    cases = []
    for dtype, head_dim, has_dropout in variants:
        for (name, fn), (block_m, block_n, num_warps, num_stages) in zip(kernels, _CONFIGS[head_dim]):
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                              HAS_DROPOUT=has_dropout, UPCAST_DOT=False)
            signature = {arg: _AOT_TYPES.get(arg, "i32").replace("DTYPE", dtype)
                         for arg in fn.arg_names if arg not in constexprs}
            variant = "dropout" if has_dropout else "plain"
            cases.append((f"window_attention_{name}_{dtype}_d{head_dim}_{variant}", fn, signature,
                          constexprs, num_warps, num_stages))
    return cases


AOT_CASES = _aot_cases()
