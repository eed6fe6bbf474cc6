"""Triton attention with relative-position terms on packed tokens: forward and backward.

Scores of query i and key j of one sequence (fastbert.ops.relative_attention):
    scale * q_i . k_j + Q_REL[i, h, IDX[i - j + L - 1]] + K_REL[j, h, IDX[i - j + L - 1]]
The relative terms are gathered per (i, j) pair inside the kernels, from the q_rel / k_rel rows and the
index table, so no (seq x seq) tensor ever reaches memory. Tensors are read through their strides: a
stride-0 q_rel (MPNet's table broadcast over tokens) costs nothing extra.

Otherwise this is kernels/attention.py's varlen path (its helpers, numerics and dropout stream): one
program per (query block, head, sequence) in the forward and the dq pass, per (key block, head,
sequence) in the dk/dv pass; online softmax in base 2; logsumexp saved as (heads, tokens).

Backward of the relative terms: d score[i, j] = ds[i, j] goes to bucket IDX[i - j + L - 1] of row i of
dq_rel (dq pass) and of row j of dk_rel (dk/dv pass). A program owns its rows, but the pairs of one
tile share buckets (every far distance of DeBERTa's log buckets lands in a few), so the adds are fp32
atomics into zeroed (tokens, heads, buckets) buffers: the rel gradients are not bitwise deterministic.
A stride-0 q_rel gets this full-size gradient too; autograd's expand backward sums it into the table.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.kernels.attention import (
    LOG2E,
    _base,
    _dot,
    _dropout_scale,
    _load_rows,
    _prepare,
    _same_layout,
    _stat_offsets,
    _store_rows,
)
from fastbert.kernels.host import seed_value, triton_interpreting
from fastbert.kernels.limits import attention_head_dim_problem

# BLOCK_D -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, the dq and the dk/dv kernel.
# Smaller tiles or more warps than plain attention's: the gathered terms hold (BLOCK_M, BLOCK_N)
# buckets and pointers in registers. The largest tiles tried that compile without spills on sm_80 and
# sm_90 (fp16/bf16, both terms and dropout; tests/aot/test_aot_attention.py). Not fp32: its
# tl.dot(input_precision="ieee") backward spills at any tile (as plain attention's does).
_CONFIGS = {
    16: ((64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 2)),
    32: ((64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 2)),
    64: ((64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 2)),
    128: ((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
}
_INTERPRETER_CONFIG = ((16, 16, 1, 1),) * 3


def _config(head_dim: int):
    """(BLOCK_D, forward config, dq config, dk/dv config) for this head_dim."""
    problem = attention_head_dim_problem(head_dim)
    if problem is not None:
        raise ValueError(f"Triton relative attention: {problem}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    return (block_d, *(_INTERPRETER_CONFIG if triton_interpreting() else _CONFIGS[block_d]))


@triton.jit
def _pair_offsets(IDX, rows, cols, length, seqlen):
    """(pair ok, bucket) of each (row, col) pair: inside the sequence, IDX[row - col + seqlen - 1]."""
    ok = (rows[:, None] < length) & (cols[None, :] < length)
    bucket = tl.load(IDX + (rows[:, None] - cols[None, :] + seqlen - 1), mask=ok, other=0)
    return ok, bucket


@triton.jit
def _rel_ptrs(REL, start, h, tokens, bucket, stride_t, stride_h, stride_b, ROW_IS_TOKEN: tl.constexpr):
    """Pointers to REL[start + token, h, bucket] per pair; tokens are the pairs' rows or their cols.
    int64 per token, int32 within a row (the launcher keeps bucket offsets below 2**31)."""
    token_ptrs = REL + (start + tokens).to(tl.int64) * stride_t + h.to(tl.int64) * stride_h
    if ROW_IS_TOKEN:  # if/else, not an early return: compiled Triton would go on past it
        ptrs = token_ptrs[:, None] + bucket * stride_b
    else:
        ptrs = token_ptrs[None, :] + bucket * stride_b
    return ptrs


@triton.jit
def _rel_scores(q, k, IDX, Q_REL, K_REL, start, h, rows, cols, length, seqlen, qk_scale,
                stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
                HAS_Q_REL: tl.constexpr, HAS_K_REL: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores in base 2 with the relative terms; -inf outside the sequence."""
    s = _dot(q, tl.trans(k), UPCAST_DOT) * qk_scale
    ok, bucket = _pair_offsets(IDX, rows, cols, length, seqlen)
    if HAS_Q_REL:
        ptrs = _rel_ptrs(Q_REL, start, h, rows, bucket, stride_qrt, stride_qrh, stride_qrb, True)
        s += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * LOG2E
    if HAS_K_REL:
        ptrs = _rel_ptrs(K_REL, start, h, cols, bucket, stride_krt, stride_krh, stride_krb, False)
        s += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * LOG2E
    return tl.where(ok, s, float("-inf")), ok, bucket


@triton.jit
def _rel_fwd_kernel(
    Q, K, V, O,  # (total, heads, head_dim); q, k, v strides stride_q*, o strides stride_o*
    LSE,  # (heads, total) fp32
    CU_SEQLENS, IDX,  # (batch + 1,) int32; (2 * seqlen - 1,) int32
    Q_REL, K_REL,  # (total, heads, buckets) any strides, read if HAS_Q_REL / HAS_K_REL
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
    seqlen, n_rows, n_heads,  # max_seqlen, total, heads
    qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Q_REL: tl.constexpr, HAS_K_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU_SEQLENS + b)
    length = tl.load(CU_SEQLENS + b + 1) - start
    if pid_m * BLOCK_M >= length:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    zero = b * 0
    qkv_base = _base(zero, start, h, 0, stride_qt, stride_qh)
    seed_bh = seed + b * n_heads + h

    q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: no inf - inf
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        s, _, _ = _rel_scores(q, k, IDX, Q_REL, K_REL, start, h, rows, cols, length, seqlen, qk_scale,
                              stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
                              HAS_Q_REL, HAS_K_REL, UPCAST_DOT)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # the sum above is taken before dropout, as in softmax -> dropout
            p = p * _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT)
        m_i = m_new

    # every real query sees at least itself, so l > 0 on real rows
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    lse = (m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))) / LOG2E
    _store_rows(O + _base(zero, start, h, 0, stride_ot, stride_oh), out, rows, length, stride_ot, offs_d, HEAD_DIM)
    tl.store(LSE + _stat_offsets(h, n_rows, zero, seqlen, start, rows), lse, mask=rows < length)


@triton.jit
def _rel_bwd_dq_kernel(
    Q, K, V, O, DO, DQ,  # (total, heads, head_dim); q, k, v strides stride_q*, the others stride_o*
    LSE, DELTA,  # (heads, total) fp32; delta = rowsum(dO * O), written here
    CU_SEQLENS, IDX, Q_REL, K_REL,
    DQ_REL,  # (total, heads, n_buckets) fp32, zeroed, contiguous; written if HAS_Q_REL
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
    seqlen, n_rows, n_heads, n_buckets,
    softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Q_REL: tl.constexpr, HAS_K_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU_SEQLENS + b)
    length = tl.load(CU_SEQLENS + b + 1) - start
    if pid_m * BLOCK_M >= length:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    zero = b * 0
    qkv_base = _base(zero, start, h, 0, stride_qt, stride_qh)
    o_base = _base(zero, start, h, 0, stride_ot, stride_oh)
    seed_bh = seed + b * n_heads + h
    qk_scale = softmax_scale * LOG2E

    q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
    do = _load_rows(DO + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
    o = _load_rows(O + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_rows = _stat_offsets(h, n_rows, zero, seqlen, start, rows)
    tl.store(DELTA + stat_rows, delta, mask=rows < length)
    lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        s, ok, bucket = _rel_scores(q, k, IDX, Q_REL, K_REL, start, h, rows, cols, length, seqlen, qk_scale,
                                    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
                                    HAS_Q_REL, HAS_K_REL, UPCAST_DOT)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), UPCAST_DOT)
        if HAS_DROPOUT:
            dp = dp * _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
        ds = p * (dp - delta[:, None])  # d loss / d score
        dq += _dot(ds.to(k.dtype), k, UPCAST_DOT)
        if HAS_Q_REL:
            ptrs = _rel_ptrs(DQ_REL, start, h, rows, bucket, n_heads * n_buckets, n_buckets, 1, True)
            tl.atomic_add(ptrs, ds, mask=ok, sem="relaxed")
    _store_rows(DQ + o_base, dq * softmax_scale, rows, length, stride_ot, offs_d, HEAD_DIM)


@triton.jit
def _rel_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,  # (total, heads, head_dim); q, k, v strides stride_q*, the others stride_o*
    LSE, DELTA,  # (heads, total) fp32
    CU_SEQLENS, IDX, Q_REL, K_REL,
    DK_REL,  # (total, heads, n_buckets) fp32, zeroed, contiguous; written if HAS_K_REL
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
    seqlen, n_rows, n_heads, n_buckets,
    softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Q_REL: tl.constexpr, HAS_K_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU_SEQLENS + b)
    length = tl.load(CU_SEQLENS + b + 1) - start
    if pid_n * BLOCK_N >= length:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    zero = b * 0
    qkv_base = _base(zero, start, h, 0, stride_qt, stride_qh)
    o_base = _base(zero, start, h, 0, stride_ot, stride_oh)
    seed_bh = seed + b * n_heads + h
    qk_scale = softmax_scale * LOG2E

    k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, length, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
        do = _load_rows(DO + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
        stat_rows = _stat_offsets(h, n_rows, zero, seqlen, start, rows)
        lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stat_rows, mask=rows < length, other=0.0)
        s, ok, bucket = _rel_scores(q, k, IDX, Q_REL, K_REL, start, h, rows, cols, length, seqlen, qk_scale,
                                    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
                                    HAS_Q_REL, HAS_K_REL, UPCAST_DOT)
        p = tl.math.exp2(s - lse2[:, None])  # rows past the end: lse = +inf, p = 0
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
        if HAS_K_REL:
            ptrs = _rel_ptrs(DK_REL, start, h, cols, bucket, n_heads * n_buckets, n_buckets, 1, False)
            tl.atomic_add(ptrs, ds, mask=ok, sem="relaxed")
    _store_rows(DK + o_base, dk * softmax_scale, cols, length, stride_ot, offs_d, HEAD_DIM)
    _store_rows(DV + o_base, dv, cols, length, stride_ot, offs_d, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _rel_strides(rel: Optional[torch.Tensor]) -> tuple[int, int, int]:
    return tuple(rel.stride()) if rel is not None else (0, 0, 0)


def _rel_layout(rel: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """rel as is when its offsets within one (token, head) row fit int32 (the kernels' bucket offsets),
    else a contiguous copy."""
    if rel is None or rel.shape[2] * abs(rel.stride(2)) < 2**31:
        return rel
    return rel.contiguous()


def _flags(q, q_rel, k_rel, dropout_p) -> dict:
    return dict(HEAD_DIM=q.shape[-1], HAS_Q_REL=q_rel is not None, HAS_K_REL=k_rel is not None,
                HAS_DROPOUT=dropout_p > 0.0, UPCAST_DOT=triton_interpreting() and q.dtype == torch.bfloat16)


def _common_args(q, q_rel, k_rel, out_like):
    """The stride arguments every kernel takes, in order."""
    return (q.stride(0), q.stride(1), out_like.stride(0), out_like.stride(1), *_rel_strides(q_rel),
            *_rel_strides(k_rel))


def relative_fwd(q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, softmax_scale, dropout_p, seed):
    """Launch the forward; returns (out like q, lse (heads, total) fp32)."""
    q, k, v = _same_layout(q, k, v)
    q_rel, k_rel = _rel_layout(q_rel), _rel_layout(k_rel)
    total, heads = q.shape[0], q.shape[1]
    batch = cu_seqlens.numel() - 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    block_d, (block_m, block_n, num_warps, num_stages), _, _ = _config(q.shape[-1])
    grid = (triton.cdiv(max_seqlen, block_m), heads, batch)
    if min(grid) == 0:
        return out, lse
    dummy = q  # never read when the flag is off
    _rel_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, index, q_rel if q_rel is not None else dummy,
        k_rel if k_rel is not None else dummy, *_common_args(q, q_rel, k_rel, out),
        max_seqlen, total, heads, softmax_scale * LOG2E.value, dropout_p, seed,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **_flags(q, q_rel, k_rel, dropout_p),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _rel_grad_buffer(q, rel):
    """Zeroed fp32 (total, heads, buckets) accumulator for a rel gradient; a 1-element stand-in if absent."""
    if rel is None:
        return torch.zeros(1, dtype=torch.float32, device=q.device)
    return torch.zeros(q.shape[0], q.shape[1], rel.shape[2], dtype=torch.float32, device=q.device)


def relative_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, index, q_rel, k_rel, softmax_scale,
                 dropout_p, seed):
    """Launch the backward; returns (dq, dk, dv, dq_rel, dk_rel): q's shape, then fp32 (total, heads,
    buckets) or None."""
    q, k, v = _same_layout(q, k, v)
    q_rel, k_rel = _rel_layout(q_rel), _rel_layout(k_rel)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    out, dout = (t.contiguous() for t in (out, dout))  # read with dq's strides
    dq_rel, dk_rel = _rel_grad_buffer(q, q_rel), _rel_grad_buffer(q, k_rel)
    delta = torch.empty_like(lse)
    batch, heads = cu_seqlens.numel() - 1, q.shape[1]
    block_d, _, dq_config, dkdv_config = _config(q.shape[-1])
    if min(batch, heads, max_seqlen) > 0:
        dummy = q
        rels = (q_rel if q_rel is not None else dummy, k_rel if k_rel is not None else dummy)
        flags = _flags(q, q_rel, k_rel, dropout_p)
        block_m, block_n, num_warps, num_stages = dq_config
        _rel_bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), heads, batch)](
            q, k, v, out, dout, dq, lse, delta, cu_seqlens, index, *rels, dq_rel,
            *_common_args(q, q_rel, k_rel, dq), max_seqlen, q.shape[0], heads,
            dq_rel.shape[-1], softmax_scale, dropout_p, seed,
            BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
        )
        block_m, block_n, num_warps, num_stages = dkdv_config
        _rel_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), heads, batch)](
            q, k, v, dout, dk, dv, lse, delta, cu_seqlens, index, *rels, dk_rel,
            *_common_args(q, q_rel, k_rel, dq), max_seqlen, q.shape[0], heads,
            dk_rel.shape[-1], softmax_scale, dropout_p, seed,
            BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
        )
    return dq, dk, dv, (dq_rel if q_rel is not None else None), (dk_rel if k_rel is not None else None)


# ----------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces these as opaque ops)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastbert::triton_relative_attention_fwd", mutates_args=())
def _relative_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    index: torch.Tensor, q_rel: Optional[torch.Tensor], k_rel: Optional[torch.Tensor], softmax_scale: float,
    dropout_p: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return relative_fwd(q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, softmax_scale, dropout_p,
                        seed_value(seed))


@_relative_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, softmax_scale, dropout_p, seed):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[1], q.shape[0],
                                                                              dtype=torch.float32)


@torch.library.custom_op("fastbert::triton_relative_attention_bwd", mutates_args=())
def _relative_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, max_seqlen: int, index: torch.Tensor, q_rel: Optional[torch.Tensor],
    k_rel: Optional[torch.Tensor], softmax_scale: float, dropout_p: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dq_rel, dk_rel = relative_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, index, q_rel,
                                              k_rel, softmax_scale, dropout_p, seed_value(seed))
    # custom ops return tensors, not None: an empty stand-in for an absent term
    return dq, dk, dv, _or_empty(dq_rel, q), _or_empty(dk_rel, q)


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0, dtype=torch.float32)


def _fake_rel_grad(q, rel):
    if rel is None:
        return q.new_empty(0, dtype=torch.float32)
    return q.new_empty(q.shape[0], q.shape[1], rel.shape[2], dtype=torch.float32)


@_relative_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, index, q_rel, k_rel, softmax_scale, dropout_p, seed):
    grads = tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    return (*grads, _fake_rel_grad(q, q_rel), _fake_rel_grad(q, k_rel))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, softmax_scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, index, q_rel, k_rel, seed)
    ctx.max_seqlen, ctx.softmax_scale, ctx.dropout_p = max_seqlen, softmax_scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, index, q_rel, k_rel, seed = ctx.saved_tensors
    dq, dk, dv, dq_rel, dk_rel = _relative_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                                         index, q_rel, k_rel, ctx.softmax_scale, ctx.dropout_p,
                                                         seed)
    dq_rel = dq_rel.to(q_rel.dtype) if q_rel is not None else None
    dk_rel = dk_rel.to(k_rel.dtype) if k_rel is not None else None
    return dq, dk, dv, None, None, None, dq_rel, dk_rel, None, None, None


_relative_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def relative_attention_triton(q, k, v, cu_seqlens, max_seqlen, index, *, q_rel=None, k_rel=None,
                              softmax_scale=None, dropout_p=0.0):
    """The "triton" backend of fastbert.ops.relative_attention (same arguments, returns q's shape)."""
    scale, seed = _prepare(q, softmax_scale, dropout_p)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    index = index.to(device=q.device, dtype=torch.int32).contiguous()
    out, _ = _relative_attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), index, q_rel, k_rel, scale,
                                     float(dropout_p), seed)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (kernels/aot.py, tests/aot/test_aot_attention.py)
# ----------------------------------------------------------------------------------------------
_AOT_TYPES = {
    **{name: "*DTYPE" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Q_REL", "K_REL")},
    "LSE": "*fp32", "DELTA": "*fp32", "DQ_REL": "*fp32", "DK_REL": "*fp32", "CU_SEQLENS": "*i32", "IDX": "*i32",
    "qk_scale": "fp32", "softmax_scale": "fp32", "dropout_p": "fp32", "seed": "i64",
}


def _aot_cases() -> list[tuple]:
    """Each kernel with the launchers' config: both relative terms (DeBERTa, the heaviest) with dropout
    in fp16 and bf16 at head_dim 64 and 128, plus MPNet's inference variant (q_rel only, no dropout).
    fp16/bf16 as for plain attention; fp32 spills (see _CONFIGS)."""
    kernels = (("fwd", _rel_fwd_kernel), ("bwd_dq", _rel_bwd_dq_kernel), ("bwd_dkdv", _rel_bwd_dkdv_kernel))
    variants = [(dtype, head_dim, True, True) for dtype in ("fp16", "bf16") for head_dim in (64, 128)]
    variants.append(("bf16", 64, False, False))
    cases = []
    for dtype, head_dim, has_k_rel, has_dropout in variants:
        for (name, fn), (block_m, block_n, num_warps, num_stages) in zip(kernels, _CONFIGS[head_dim]):
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                              HAS_Q_REL=True, HAS_K_REL=has_k_rel, HAS_DROPOUT=has_dropout, UPCAST_DOT=False)
            signature = {arg: _AOT_TYPES.get(arg, "i32").replace("DTYPE", dtype)
                         for arg in fn.arg_names if arg not in constexprs}
            variant = "c2p_p2c_dropout" if has_k_rel else "bias"
            cases.append((f"relative_attention_{name}_{dtype}_d{head_dim}_{variant}", fn, signature, constexprs,
                          num_warps, num_stages))
    return cases


AOT_CASES = _aot_cases()
