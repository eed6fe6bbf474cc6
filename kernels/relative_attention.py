"""Triton attention with relative-position terms on packed tokens: forward and backward.

Scores of query i and key j of one sequence (fastbert.ops.relative_attention):
    scale * q_i . k_j + Q_REL[i, h, IDX[i - j + L - 1]] + K_REL[j, h, IDX[i - j + L - 1]]
The relative terms are gathered per (i, j) pair inside the kernels, from the q_rel / k_rel rows and the
index table, so no (seq x seq) tensor ever reaches memory. Tensors are read through their strides: a
stride-0 q_rel (MPNet's table broadcast over tokens) costs nothing extra.

Otherwise this is kernels/attention.py's varlen path, on the same program bodies (kernels/flash_tile.py:
numerics, dropout stream, online softmax in base 2, logsumexp saved as (heads, tokens)): one program per
(query block, head, sequence) in the forward and the dq pass, per (key block, head, sequence) in the
dk/dv pass; `_rel_scores` is their SCORES and `_rel_grad` their GRAD.

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

from fastbert.kernels import flash_tile
from fastbert.kernels.host import seed_value

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
def _rel_scores(q, k, rows, cols, key_ok, start, h, length, seqlen, qk_scale, args, UPCAST_DOT: tl.constexpr):
    """flash_tile's SCORES: (BLOCK_M, BLOCK_N) fp32 scores in base 2 with the relative terms, -inf outside
    the sequence; aux = (pair ok, bucket) for _rel_grad. args = (IDX, Q_REL, K_REL, their strides, flags)."""
    IDX, Q_REL, K_REL, stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb, HAS_Q_REL, \
        HAS_K_REL = args
    s = flash_tile.dot(q, tl.trans(k), UPCAST_DOT) * qk_scale
    ok, bucket = _pair_offsets(IDX, rows, cols, length, seqlen)
    if HAS_Q_REL:
        ptrs = _rel_ptrs(Q_REL, start, h, rows, bucket, stride_qrt, stride_qrh, stride_qrb, True)
        s += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * flash_tile.LOG2E
    if HAS_K_REL:
        ptrs = _rel_ptrs(K_REL, start, h, cols, bucket, stride_krt, stride_krh, stride_krb, False)
        s += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * flash_tile.LOG2E
    return tl.where(ok, s, float("-inf")), (ok, bucket)


@triton.jit
def _rel_grad(ds, aux, start, h, rows, cols, args):
    """flash_tile's GRAD: each pair's d score into its bucket of the rows' (dq pass, ROW_IS_TOKEN) or the
    cols' (dk/dv pass) rel gradient. args = (DREL, n_heads, n_buckets, HAS_REL, ROW_IS_TOKEN)."""
    DREL, n_heads, n_buckets, HAS_REL, ROW_IS_TOKEN = args
    ok, bucket = aux
    if HAS_REL:
        if ROW_IS_TOKEN:
            ptrs = _rel_ptrs(DREL, start, h, rows, bucket, n_heads * n_buckets, n_buckets, 1, True)
        else:
            ptrs = _rel_ptrs(DREL, start, h, cols, bucket, n_heads * n_buckets, n_buckets, 1, False)
        tl.atomic_add(ptrs, ds, mask=ok, sem="relaxed")


# Kernels: Q, K, V, O, DO, DQ, DK, DV (total, heads, head_dim), q, k, v with strides stride_q*, the others
# stride_o*; LSE, DELTA (heads, total) fp32; CU_SEQLENS (batch + 1,) int32; IDX (2 * seqlen - 1,) int32;
# Q_REL, K_REL (total, heads, buckets), any strides, read if HAS_Q_REL / HAS_K_REL; seqlen = max_seqlen,
# n_rows = total. The batch strides are 0 (packed tokens), and no window (0).
@triton.jit
def _rel_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, IDX, Q_REL, K_REL,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
    seqlen, n_rows, n_heads, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Q_REL: tl.constexpr, HAS_K_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    rel = (IDX, Q_REL, K_REL, stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb, HAS_Q_REL,
           HAS_K_REL)
    flash_tile.fwd(Q, K, V, O, LSE, CU_SEQLENS, Q, 0, stride_qt, stride_qh, 0, stride_ot, stride_oh,
                   seqlen, n_rows, n_heads, 0, qk_scale, dropout_p, seed, _rel_scores, rel, HEAD_DIM, BLOCK_D,
                   BLOCK_M, BLOCK_N, IS_VARLEN=True, HAS_MASK=False, WINDOWED=False, EMPTY_ROWS=False,
                   HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


@triton.jit
def _rel_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS, IDX, Q_REL, K_REL,  # writes DQ and DELTA = rowsum(dO * O)
    DQ_REL,  # (total, heads, n_buckets) fp32, zeroed, contiguous; written if HAS_Q_REL
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
    seqlen, n_rows, n_heads, n_buckets, softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # BLOCK_M queries
    HAS_Q_REL: tl.constexpr, HAS_K_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    rel = (IDX, Q_REL, K_REL, stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb, HAS_Q_REL,
           HAS_K_REL)
    flash_tile.bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS, Q, 0, stride_qt, stride_qh, 0, stride_ot,
                      stride_oh, seqlen, n_rows, n_heads, 0, softmax_scale, dropout_p, seed, _rel_scores, rel,
                      _rel_grad, (DQ_REL, n_heads, n_buckets, HAS_Q_REL, True), HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                      IS_VARLEN=True, HAS_MASK=False, WINDOWED=False, HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


@triton.jit
def _rel_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, IDX, Q_REL, K_REL,  # writes DK, DV
    DK_REL,  # like DQ_REL; written if HAS_K_REL
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb,
    seqlen, n_rows, n_heads, n_buckets, softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # per BLOCK_N keys
    HAS_Q_REL: tl.constexpr, HAS_K_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    rel = (IDX, Q_REL, K_REL, stride_qrt, stride_qrh, stride_qrb, stride_krt, stride_krh, stride_krb, HAS_Q_REL,
           HAS_K_REL)
    flash_tile.bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, Q, 0, stride_qt, stride_qh, 0, stride_ot,
                        stride_oh, seqlen, n_rows, n_heads, 0, softmax_scale, dropout_p, seed, _rel_scores, rel,
                        _rel_grad, (DK_REL, n_heads, n_buckets, HAS_K_REL, False), HEAD_DIM, BLOCK_D, BLOCK_M,
                        BLOCK_N, IS_VARLEN=True, HAS_MASK=False, WINDOWED=False, HAS_DROPOUT=HAS_DROPOUT,
                        UPCAST_DOT=UPCAST_DOT)


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


def _common_args(q, q_rel, k_rel, out_like):
    """The stride arguments every kernel takes, in order."""
    return (q.stride(0), q.stride(1), out_like.stride(0), out_like.stride(1), *_rel_strides(q_rel),
            *_rel_strides(k_rel))


def relative_fwd(q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, softmax_scale, dropout_p, seed):
    """Launch the forward; returns (out like q, lse (heads, total) fp32)."""
    q, k, v = flash_tile.same_layout(q, k, v)
    q_rel, k_rel = _rel_layout(q_rel), _rel_layout(k_rel)
    total, heads = q.shape[0], q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    block_d, config, _, _ = flash_tile.tile_config(_CONFIGS, q.shape[-1], "relative attention")
    rels = (q if q_rel is None else q_rel, q if k_rel is None else k_rel)  # q: never read when the flag is off
    flash_tile.launch(_rel_fwd_kernel, config, block_d, max_seqlen, heads, cu_seqlens.numel() - 1,
                      q, k, v, out, lse, cu_seqlens, index, *rels, *_common_args(q, q_rel, k_rel, out),
                      max_seqlen, total, heads, softmax_scale * flash_tile.LOG2E.value, dropout_p, seed,
                      **flash_tile.kernel_flags(q, dropout_p, HAS_Q_REL=q_rel is not None, HAS_K_REL=k_rel is not None))
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
    q, k, v = flash_tile.same_layout(q, k, v)
    q_rel, k_rel = _rel_layout(q_rel), _rel_layout(k_rel)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    out, dout = (t.contiguous() for t in (out, dout))  # read with dq's strides
    dq_rel, dk_rel = _rel_grad_buffer(q, q_rel), _rel_grad_buffer(q, k_rel)
    delta = torch.empty_like(lse)
    batch, heads = cu_seqlens.numel() - 1, q.shape[1]
    block_d, _, dq_config, dkdv_config = flash_tile.tile_config(_CONFIGS, q.shape[-1], "relative attention")
    rels = (q if q_rel is None else q_rel, q if k_rel is None else k_rel)
    flags = flash_tile.kernel_flags(q, dropout_p, HAS_Q_REL=q_rel is not None, HAS_K_REL=k_rel is not None)
    args = (*_common_args(q, q_rel, k_rel, dq), max_seqlen, q.shape[0], heads)
    flash_tile.launch(_rel_bwd_dq_kernel, dq_config, block_d, max_seqlen, heads, batch,
                      q, k, v, out, dout, dq, lse, delta, cu_seqlens, index, *rels, dq_rel, *args,
                      dq_rel.shape[-1], softmax_scale, dropout_p, seed, **flags)
    flash_tile.launch(_rel_bwd_dkdv_kernel, dkdv_config, block_d, max_seqlen, heads, batch,
                      q, k, v, dout, dk, dv, lse, delta, cu_seqlens, index, *rels, dk_rel, *args,
                      dk_rel.shape[-1], softmax_scale, dropout_p, seed, by_keys=True, **flags)
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
    scale, seed = flash_tile.prepare(q, softmax_scale, dropout_p)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    index = index.to(device=q.device, dtype=torch.int32).contiguous()
    out, _ = _relative_attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), index, q_rel, k_rel, scale,
                                     float(dropout_p), seed)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (kernels/aot.py, tests/aot/test_aot_attention.py)
# ----------------------------------------------------------------------------------------------
def _aot_cases() -> list[tuple]:
    """Each kernel with the launchers' config: both relative terms (DeBERTa, the heaviest) with dropout
    in fp16 and bf16 at head_dim 64 and 128, plus MPNet's inference variant (q_rel only, no dropout).
    fp16/bf16 as for plain attention; fp32 spills (see _CONFIGS)."""
    kernels = (("fwd", _rel_fwd_kernel), ("bwd_dq", _rel_bwd_dq_kernel), ("bwd_dkdv", _rel_bwd_dkdv_kernel))
    variants = [(dtype, head_dim, True, True) for dtype in ("fp16", "bf16") for head_dim in (64, 128)]
    variants.append(("bf16", 64, False, False))
    return flash_tile.aot_cases("relative_attention", kernels, _CONFIGS, [
        (dtype, head_dim, "c2p_p2c_dropout" if has_k_rel else "bias",
         dict(HAS_Q_REL=True, HAS_K_REL=has_k_rel, HAS_DROPOUT=has_dropout, UPCAST_DOT=False))
        for dtype, head_dim, has_k_rel, has_dropout in variants])


AOT_CASES = _aot_cases()
