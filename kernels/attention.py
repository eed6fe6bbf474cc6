"""Flash attention in Triton: forward and backward, padded (key-padding mask) and varlen (cu_seqlens).

One kernel family serves both entry points. A program handles one (query or key block, head,
sequence); where a sequence lives is described by
  - IS_VARLEN: tokens packed as (total, heads, head_dim); sequence b is rows cu_seqlens[b]..[b+1],
  - otherwise padded (batch, heads, seq, head_dim); sequence b is batch b, all `seq` rows, and with
    HAS_MASK a (batch, seq) key-padding mask is loaded inside the kernel.
Every tensor is addressed by strides (batch, token, head; the head_dim stride is 1), so views of a
transposed (batch, seq, heads, head_dim) or a packed (total, 3, heads, head_dim) tensor need no copy.

Why the padded mask is read in the kernel instead of unpad -> varlen -> re-pad: the reference
(`attention_ref`) gives every query, padding positions included, softmax over the kept keys; only a
sequence with no kept key at all gets zeros. Unpadding drops the queries at padding, so it would need
a second pass for them. Reading the mask per key block costs one small load and handles any padding
side, holes and fully masked sequences alike; the no-mask path compiles without it (HAS_MASK=False).

Numerics: scores in fp32 in base 2 (scale folded with log2(e)), online softmax with the running max
starting at a finite -1e30 so that fully masked blocks never form inf - inf; a row with no key ends
with sum 0, gets output 0 and logsumexp +inf, which makes every recomputed probability in the
backward exactly 0 (zero gradients, never NaN). The logsumexp (natural log, fp32) is saved as
(heads, rows) for the backward.

Dropout: Philox `tl.rand(seed + batch*heads + head, query * seqlen + key)`, with the seed drawn on
the host from torch's default generator; the backward regenerates the same keep mask.

Backward: `_attention_bwd_dq_kernel` (one program per query block, loops over key blocks; it also
computes delta = rowsum(dO * O)), then `_attention_bwd_dkdv_kernel` (one program per key block,
loops over query blocks). No atomics: the backward is deterministic whether or not
torch.use_deterministic_algorithms is on, at the price of recomputing QK^T and dO V^T once more.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.kernels.host import draw_seed, seed_value, triton_interpreting
from fastbert.kernels.limits import attention_head_dim_problem

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)

# Block sizes per padded head dim (BLOCK_D), one table for sm_80 and sm_90:
#   BLOCK_D -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, the dq and the dk/dv kernel.
# Picked as the largest tiles with no register spill on sm_80 and sm_90 for the heaviest variant
# (key mask + dropout: the Philox tile costs many registers), fp16 and bf16; measured by
# tests/aot/test_aot_attention.py (numbers in docs/kernels.md).
_CONFIGS = {
    16: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
    32: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
    64: ((64, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2)),
    128: ((64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2)),
}
# The CPU interpreter: small tiles so that tiny test shapes still cross several blocks (and tl.dot
# keeps every dim >= 16).
_INTERPRETER_CONFIG = ((16, 16, 1, 1),) * 3


def _config(head_dim: int):
    """(BLOCK_D, forward config, dq config, dk/dv config) for this head_dim."""
    problem = attention_head_dim_problem(head_dim)
    if problem is not None:
        raise ValueError(f"Triton attention: {problem}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    return (block_d, *(_INTERPRETER_CONFIG if triton_interpreting() else _CONFIGS[block_d]))


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence(CU_SEQLENS, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first token row, length, batch index for the batch stride) of sequence b."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + b)
        length = tl.load(CU_SEQLENS + b + 1) - start
        batch = b * 0
    else:
        start = b * 0
        length = seqlen
        batch = b
    return start, length, batch


@triton.jit
def _base(batch, start, h, stride_b, stride_t, stride_h):
    """int64 offset of (batch, first token, head) for one tensor."""
    return batch.to(tl.int64) * stride_b + start.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h


@triton.jit
def _stat_offsets(h, n_rows, batch, seqlen, start, rows):
    """Offsets of the rows' entries in a (heads, rows) statistic (LSE, DELTA)."""
    return h.to(tl.int64) * n_rows + batch * seqlen + start + rows


@triton.jit
def _load_rows(ptr, rows, length, stride_t, offs_d, HEAD_DIM: tl.constexpr):
    """(len(rows), BLOCK_D) tile; zeros past the sequence end and past HEAD_DIM."""
    mask = (rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptr + rows[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, tile, rows, length, stride_t, offs_d, HEAD_DIM: tl.constexpr):
    mask = (rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptr + rows[:, None] * stride_t + offs_d[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST_DOT (interpreter + bf16 only) works around bf16 tl.dot."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _key_ok(KEY_MASK, b, seqlen, cols, length, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) True for keys inside the sequence and kept by the padding mask."""
    ok = cols < length
    if HAS_MASK:
        ok &= tl.load(KEY_MASK + b.to(tl.int64) * seqlen + cols, mask=ok, other=0) != 0
    return ok


@triton.jit
def _scores(q, k, key_ok, qk_scale, UPCAST_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores in base-2 units, -inf at dropped keys."""
    s = _dot(q, tl.trans(k), UPCAST_DOT) * qk_scale
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p):
    """(BLOCK_M, BLOCK_N) 1/(1-p) where the key is kept, 0 where dropped; the same in fwd and bwd."""
    rnd = tl.rand(seed_bh, rows[:, None] * seqlen + cols[None, :])
    return tl.where(rnd >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_kernel(
    Q, K, V,  # (batch, heads, seq, head_dim) or (total, heads, head_dim), strides stride_q*
    O,  # like Q, strides stride_o*
    LSE,  # (heads, rows) fp32; rows = batch * seq (padded) or total (varlen)
    CU_SEQLENS,  # (batch + 1,) int32, read if IS_VARLEN
    KEY_MASK,  # (batch, seq) int8, 1 = keep, read if HAS_MASK
    stride_qb, stride_qt, stride_qh,  # q, k, v: batch (0 if varlen), token, head
    stride_ob, stride_ot, stride_oh,  # o
    seqlen,  # padded seq length, or max_seqlen (varlen)
    n_rows,  # LSE row count
    n_heads,
    qk_scale,  # softmax_scale * log2(e)
    dropout_p,
    seed,  # Philox seed (dropout)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, batch = _sequence(CU_SEQLENS, b, seqlen, IS_VARLEN)
    if pid_m * BLOCK_M >= length:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
    seed_bh = seed + b * n_heads + h

    # this block's queries stay in registers for the whole key loop
    q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # running max (base 2); finite: no inf - inf
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        key_ok = _key_ok(KEY_MASK, b, seqlen, cols, length, HAS_MASK)
        s = _scores(q, k, key_ok, qk_scale, UPCAST_DOT)
        # online softmax: rescale what was accumulated to the new max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # the sum above is taken before dropout, as in softmax -> dropout
            p = p * _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT)
        m_i = m_new

    # normalize; a row without keys (l = 0) gets zeros and logsumexp +inf
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) / LOG2E, float("inf"))
    o_base = _base(batch, start, h, stride_ob, stride_ot, stride_oh)
    _store_rows(O + o_base, out, rows, length, stride_ot, offs_d, HEAD_DIM)
    lse_rows = _stat_offsets(h, n_rows, batch, seqlen, start, rows)
    tl.store(LSE + lse_rows, lse, mask=rows < length)


def _strides(t: torch.Tensor, is_varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (batch, heads, seq, D) or (total, heads, D) tensor."""
    if is_varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(2), t.stride(1)


def _same_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors unchanged if they share strides with a unit head_dim stride, else contiguous copies."""
    first = tensors[0]
    if first.stride(-1) == 1 and all(t.stride() == first.stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def _empty_out(q: torch.Tensor, is_varlen: bool) -> torch.Tensor:
    """Uninitialized tensor shaped like q; padded ones are (batch, seq, heads, D) memory viewed as
    (batch, heads, seq, D)."""
    if is_varlen:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, heads, seq, head_dim = q.shape
    return torch.empty(batch, seq, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)


def _geometry(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int):
    """(is_varlen, batch, heads, seqlen, rows) of a call."""
    if cu_seqlens is not None:
        return True, cu_seqlens.numel() - 1, q.shape[1], max_seqlen, q.shape[0]
    batch, heads, seq, _ = q.shape
    return False, batch, heads, seq, batch * seq


def _flags(q, cu_seqlens, key_mask, dropout_p) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1],
        IS_VARLEN=cu_seqlens is not None,
        HAS_MASK=key_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        UPCAST_DOT=triton_interpreting() and q.dtype == torch.bfloat16,
    )


def attention_fwd(q, k, v, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    """Launch the forward; returns (out like q, lse (heads, rows) fp32)."""
    is_varlen, batch, heads, seqlen, rows = _geometry(q, cu_seqlens, max_seqlen)
    q, k, v = _same_layout(q, k, v)
    out = _empty_out(q, is_varlen)
    lse = torch.empty(heads, rows, dtype=torch.float32, device=q.device)
    block_d, (block_m, block_n, num_warps, num_stages), _, _ = _config(q.shape[-1])
    grid = (triton.cdiv(seqlen, block_m), heads, batch)
    if min(grid) == 0:
        return out, lse
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, key_mask,
        *_strides(q, is_varlen), *_strides(out, is_varlen),
        seqlen, rows, heads, softmax_scale * LOG2E.value, dropout_p, seed,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        **_flags(q, cu_seqlens, key_mask, dropout_p),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V,  # (batch, heads, seq, head_dim) or (total, heads, head_dim), strides stride_q*
    O, DO, DQ,  # like Q, strides stride_o*
    LSE, DELTA,  # (heads, rows) fp32: saved logsumexp; delta = rowsum(dO * O), written here
    CU_SEQLENS,  # (batch + 1,) int32, read if IS_VARLEN
    KEY_MASK,  # (batch, seq) int8, read if HAS_MASK
    stride_qb, stride_qt, stride_qh,  # q, k, v
    stride_ob, stride_ot, stride_oh,  # o, do, dq
    seqlen, n_rows, n_heads,
    softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, batch = _sequence(CU_SEQLENS, b, seqlen, IS_VARLEN)
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
    # delta = rowsum(dO * O), needed by both backward kernels
    o = _load_rows(O + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_rows = _stat_offsets(h, n_rows, batch, seqlen, start, rows)
    tl.store(DELTA + stat_rows, delta, mask=rows < length)
    lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
        key_ok = _key_ok(KEY_MASK, b, seqlen, cols, length, HAS_MASK)
        # recompute probabilities from the saved logsumexp (0 where lse = +inf)
        p = tl.math.exp2(_scores(q, k, key_ok, qk_scale, UPCAST_DOT) - lse2[:, None])
        dp = _dot(do, tl.trans(v), UPCAST_DOT)
        if HAS_DROPOUT:
            dp = dp * _dropout_scale(seed_bh, rows, cols, seqlen, dropout_p)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST_DOT)
    _store_rows(DQ + o_base, dq * softmax_scale, rows, length, stride_ot, offs_d, HEAD_DIM)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V,  # (batch, heads, seq, head_dim) or (total, heads, head_dim), strides stride_q*
    DO, DK, DV,  # like Q, strides stride_o*
    LSE, DELTA,  # (heads, rows) fp32
    CU_SEQLENS,  # (batch + 1,) int32, read if IS_VARLEN
    KEY_MASK,  # (batch, seq) int8, read if HAS_MASK
    stride_qb, stride_qt, stride_qh,  # q, k, v
    stride_ob, stride_ot, stride_oh,  # do, dk, dv
    seqlen, n_rows, n_heads,
    softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length, batch = _sequence(CU_SEQLENS, b, seqlen, IS_VARLEN)
    if pid_n * BLOCK_N >= length:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qkv_base = _base(batch, start, h, stride_qb, stride_qt, stride_qh)
    o_base = _base(batch, start, h, stride_ob, stride_ot, stride_oh)
    seed_bh = seed + b * n_heads + h
    qk_scale = softmax_scale * LOG2E

    # this block's keys and values stay in registers for the whole query loop
    k = _load_rows(K + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    v = _load_rows(V + qkv_base, cols, length, stride_qt, offs_d, HEAD_DIM)
    key_ok = _key_ok(KEY_MASK, b, seqlen, cols, length, HAS_MASK)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, length, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q + qkv_base, rows, length, stride_qt, offs_d, HEAD_DIM)
        do = _load_rows(DO + o_base, rows, length, stride_ot, offs_d, HEAD_DIM)
        stat_rows = _stat_offsets(h, n_rows, batch, seqlen, start, rows)
        lse2 = tl.load(LSE + stat_rows, mask=rows < length, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stat_rows, mask=rows < length, other=0.0)
        # recompute probabilities; rows past the end have lse = +inf, hence p = 0
        p = tl.math.exp2(_scores(q, k, key_ok, qk_scale, UPCAST_DOT) - lse2[:, None])
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


def attention_bwd(dout, q, k, v, out, lse, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    """Launch the backward; returns (dq, dk, dv) laid out like the forward output."""
    is_varlen, batch, heads, seqlen, rows = _geometry(q, cu_seqlens, max_seqlen)
    q, k, v = _same_layout(q, k, v)
    dq, dk, dv = (_empty_out(q, is_varlen) for _ in range(3))
    # out and dout are read with dq's strides
    out, dout = (t if t.stride() == dq.stride() else _empty_out(q, is_varlen).copy_(t) for t in (out, dout))
    delta = torch.empty_like(lse)
    block_d, _, dq_config, dkdv_config = _config(q.shape[-1])
    if min(batch, heads, seqlen) == 0:
        return dq, dk, dv
    flags = _flags(q, cu_seqlens, key_mask, dropout_p)
    args = (*_strides(q, is_varlen), *_strides(dq, is_varlen), seqlen, rows, heads, softmax_scale,
            dropout_p, seed)
    block_m, block_n, num_warps, num_stages = dq_config
    _attention_bwd_dq_kernel[(triton.cdiv(seqlen, block_m), heads, batch)](
        q, k, v, out, dout, dq, lse, delta, cu_seqlens, key_mask, *args,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
    )
    block_m, block_n, num_warps, num_stages = dkdv_config
    _attention_bwd_dkdv_kernel[(triton.cdiv(seqlen, block_n), heads, batch)](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens, key_mask, *args,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags, num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces these as opaque ops, no graph break)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastbert::triton_flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], max_seqlen: int, softmax_scale: float, dropout_p: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed_value(seed))


@_flash_attention_fwd.register_fake
def _(q, k, v, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    is_varlen, _, heads, _, rows = _geometry(q, cu_seqlens, max_seqlen)
    return _empty_out(q, is_varlen), q.new_empty(heads, rows, dtype=torch.float32)


@torch.library.custom_op("fastbert::triton_flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int, softmax_scale: float, dropout_p: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(dout, q, k, v, out, lse, key_mask, cu_seqlens, max_seqlen, softmax_scale,
                         dropout_p, seed_value(seed))


@_flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    is_varlen = cu_seqlens is not None
    return tuple(_empty_out(q, is_varlen) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, cu_seqlens, seed)
    ctx.max_seqlen, ctx.softmax_scale, ctx.dropout_p = max_seqlen, softmax_scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd(dout, q, k, v, out, lse, key_mask, cu_seqlens, ctx.max_seqlen,
                                      ctx.softmax_scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None


_flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Entry points (called by fastbert.ops.attention with backend "triton")
# ----------------------------------------------------------------------------------------------
def _prepare(q, softmax_scale, dropout_p):
    """(scale, seed): the default scale 1/sqrt(head_dim); when dropout is on, a Philox seed drawn from
    torch's default generator as a CPU tensor (no sync, and torch.compile keeps it in the graph)."""
    problem = attention_head_dim_problem(q.shape[-1])
    if problem is not None:
        raise ValueError(f"Triton attention: {problem}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return scale, (draw_seed() if dropout_p > 0.0 else None)


def attention_triton(q, k, v, attention_mask=None, *, softmax_scale=None, dropout_p=0.0):
    """Padded attention: q, k, v (batch, heads, seq, head_dim); attention_mask None or (batch, seq)
    key-padding mask (nonzero/True = keep). Returns (batch, heads, seq, head_dim)."""
    scale, seed = _prepare(q, softmax_scale, dropout_p)
    key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.int8)
    out, _ = _flash_attention_fwd(q, k, v, key_mask, None, q.shape[2], scale, float(dropout_p), seed)
    return out


def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, dropout_p=0.0):
    """Packed attention: q, k, v (total, heads, head_dim); cu_seqlens int32 (batch + 1,);
    max_seqlen the longest length. Returns (total, heads, head_dim)."""
    scale, seed = _prepare(q, softmax_scale, dropout_p)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    out, _ = _flash_attention_fwd(q, k, v, None, cu_seqlens, int(max_seqlen), scale, float(dropout_p), seed)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (kernels/aot.py, tests/aot/test_aot_attention.py)
# ----------------------------------------------------------------------------------------------
# Argument types for the AOT signatures; every other non-constexpr argument is an i32.
_AOT_TYPES = {
    **{name: "*DTYPE" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")},
    "LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS": "*i32", "KEY_MASK": "*i8",
    "qk_scale": "fp32", "softmax_scale": "fp32", "dropout_p": "fp32", "seed": "i64",
}


def _aot_cases() -> list[tuple]:
    """Each kernel with the config the launchers pick, fp16 and bf16, head dims 32, 64, 128: the
    heaviest variant (padded, key mask, dropout), plus the varlen no-dropout variant (the model's
    inference path) for fp16 head_dim 64."""
    kernels = (("fwd", _attention_fwd_kernel), ("bwd_dq", _attention_bwd_dq_kernel),
               ("bwd_dkdv", _attention_bwd_dkdv_kernel))
    variants = [(dtype, head_dim, False, True) for dtype in ("fp16", "bf16") for head_dim in (32, 64, 128)]
    variants.append(("fp16", 64, True, False))
    cases = []
    for dtype, head_dim, is_varlen, has_dropout in variants:
        block_d = triton.next_power_of_2(head_dim)
        for (name, fn), (block_m, block_n, num_warps, num_stages) in zip(kernels, _CONFIGS[block_d]):
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                              IS_VARLEN=is_varlen, HAS_MASK=not is_varlen, HAS_DROPOUT=has_dropout,
                              UPCAST_DOT=False)
            signature = {arg: _AOT_TYPES.get(arg, "i32").replace("DTYPE", dtype)
                         for arg in fn.arg_names if arg not in constexprs}
            variant = "varlen" if is_varlen else "mask_dropout"
            cases.append((f"attention_{name}_{dtype}_d{head_dim}_{variant}", fn, signature, constexprs,
                          num_warps, num_stages))
    return cases


AOT_CASES = _aot_cases()
