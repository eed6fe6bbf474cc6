"""Triton sliding-window attention on packed tokens: forward and backward.

Query i of a sequence attends to keys j of the same sequence with |i - j| <= WINDOW. A program owns
one (query block, head, sequence) in the forward and the dq pass, one (key block, head, sequence) in
the dk/dv pass, and loops only over the blocks of the other side that meet its band (WINDOWED in
kernels/flash_tile.py): work is O(tokens x window), not O(tokens x length). Otherwise it is
kernels/attention.py's varlen path, on the same program bodies (flash_tile.py: numerics, dropout
stream, online softmax in base 2, logsumexp saved as (heads, tokens), backward without atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels import flash_tile
from fastbert.kernels.attention import _CONFIGS, _config
from fastbert.kernels.host import seed_value


@triton.jit
def _band_scores(q, k, rows, cols, key_ok, start, h, length, seqlen, qk_scale, args, UPCAST_DOT: tl.constexpr):
    """flash_tile's SCORES: (BLOCK_M, BLOCK_N) fp32 scores in base 2; -inf outside the sequence or the
    window (args = (window,))."""
    window = args[0]
    s = flash_tile.dot(q, tl.trans(k), UPCAST_DOT) * qk_scale
    distance = rows[:, None] - cols[None, :]
    ok = (cols[None, :] < length) & (distance <= window) & (distance >= -window)
    return tl.where(ok, s, float("-inf")), ok


# Kernels: Q, K, V, O, DO, DQ, DK, DV (total, heads, head_dim), q, k, v with strides stride_q*, the others
# stride_o*; LSE, DELTA (heads, total) fp32; CU_SEQLENS (batch + 1,) int32; seqlen = max_seqlen, n_rows =
# total, window the |i - j| limit.
@triton.jit
def _window_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    flash_tile.fwd(Q, K, V, O, LSE, CU_SEQLENS, Q, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
                   seqlen, n_rows, n_heads, window, qk_scale, dropout_p, seed, _band_scores, (window,),
                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_VARLEN=True, HAS_MASK=False, WINDOWED=True,
                   EMPTY_ROWS=False, HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


@triton.jit
def _window_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS,  # writes DQ and DELTA = rowsum(dO * O)
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window, softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # BLOCK_M queries
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    flash_tile.bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS, Q, stride_qb, stride_qt, stride_qh, stride_ob,
                      stride_ot, stride_oh, seqlen, n_rows, n_heads, window, softmax_scale, dropout_p, seed,
                      _band_scores, (window,), flash_tile.no_score_grad, (), HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                      IS_VARLEN=True, HAS_MASK=False, WINDOWED=True, HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


@triton.jit
def _window_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS,  # writes DK, DV
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, window, softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # per BLOCK_N keys
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    flash_tile.bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, Q, stride_qb, stride_qt, stride_qh, stride_ob,
                        stride_ot, stride_oh, seqlen, n_rows, n_heads, window, softmax_scale, dropout_p, seed,
                        _band_scores, (window,), flash_tile.no_score_grad, (), HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                        IS_VARLEN=True, HAS_MASK=False, WINDOWED=True, HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


def window_fwd(q, k, v, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed):
    """Launch the forward; returns (out like q, lse (heads, total) fp32)."""
    q, k, v = flash_tile.same_layout(q, k, v)
    total, heads = q.shape[0], q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    block_d, config, _, _ = _config(q.shape[-1])
    flash_tile.launch(_window_fwd_kernel, config, block_d, max_seqlen, heads, cu_seqlens.numel() - 1,
                      q, k, v, out, lse, cu_seqlens, *flash_tile.strides(q, True), *flash_tile.strides(out, True),
                      max_seqlen, total, heads, window, softmax_scale * flash_tile.LOG2E.value, dropout_p, seed,
                      **flash_tile.kernel_flags(q, dropout_p))
    return out, lse


def window_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, softmax_scale, dropout_p, seed):
    """Launch the backward; returns (dq, dk, dv), each (total, heads, head_dim) contiguous."""
    q, k, v = flash_tile.same_layout(q, k, v)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    out, dout = (t.contiguous() for t in (out, dout))  # read with dq's strides
    delta = torch.empty_like(lse)
    batch, heads = cu_seqlens.numel() - 1, q.shape[1]
    block_d, _, dq_config, dkdv_config = _config(q.shape[-1])
    args = (*flash_tile.strides(q, True), *flash_tile.strides(dq, True), max_seqlen, q.shape[0], heads, window,
            softmax_scale, dropout_p, seed)
    flags = flash_tile.kernel_flags(q, dropout_p)
    flash_tile.launch(_window_bwd_dq_kernel, dq_config, block_d, max_seqlen, heads, batch,
                      q, k, v, out, dout, dq, lse, delta, cu_seqlens, *args, **flags)
    flash_tile.launch(_window_bwd_dkdv_kernel, dkdv_config, block_d, max_seqlen, heads, batch,
                      q, k, v, dout, dk, dv, lse, delta, cu_seqlens, *args, by_keys=True, **flags)
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
    scale, seed = flash_tile.prepare(q, softmax_scale, dropout_p)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    out, _ = _window_attention_fwd(q, k, v, cu_seqlens, int(max_seqlen), int(window), scale, float(dropout_p), seed)
    return out


def _aot_cases() -> list[tuple]:
    """Each kernel with the launchers' config: bf16 head_dim 64 (ModernBERT-base) with and without
    dropout, and the heaviest variants at head_dim 128 (dropout) in fp16 and bf16."""
    kernels = (("fwd", _window_fwd_kernel), ("bwd_dq", _window_bwd_dq_kernel), ("bwd_dkdv", _window_bwd_dkdv_kernel))
    variants = [("bf16", 64, False), ("bf16", 64, True), ("fp16", 128, True), ("bf16", 128, True)]
    return flash_tile.aot_cases("window_attention", kernels, _CONFIGS,
                     [(dtype, head_dim, "dropout" if has_dropout else "plain",
                       dict(HAS_DROPOUT=has_dropout, UPCAST_DOT=False)) for dtype, head_dim, has_dropout in variants])


AOT_CASES = _aot_cases()
