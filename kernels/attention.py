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

The program bodies (online softmax in base 2, logsumexp saved as (heads, rows), the Philox dropout
stream, the backward passes) are kernels/flash_tile.py's, shared with the window and relative ops; a
row with no key gets output 0 and logsumexp +inf (EMPTY_ROWS), so its gradients are 0, never NaN.

Backward: `_attention_bwd_dq_kernel` (one program per query block, loops over key blocks; it also
computes delta = rowsum(dO * O)), then `_attention_bwd_dkdv_kernel` (one program per key block,
loops over query blocks). No atomics: the backward is deterministic whether or not
torch.use_deterministic_algorithms is on, at the price of recomputing QK^T and dO V^T once more.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.kernels import flash_tile
from fastbert.kernels.host import seed_value

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


def _config(head_dim: int):
    """(BLOCK_D, forward config, dq config, dk/dv config) for this head_dim."""
    return flash_tile.tile_config(_CONFIGS, head_dim, "attention")


@triton.jit
def _masked_scores(q, k, rows, cols, key_ok, start, h, length, seqlen, qk_scale, args, UPCAST_DOT: tl.constexpr):
    """flash_tile's SCORES: (BLOCK_M, BLOCK_N) fp32 scores in base-2 units, -inf at dropped keys."""
    s = flash_tile.dot(q, tl.trans(k), UPCAST_DOT) * qk_scale
    return tl.where(key_ok[None, :], s, float("-inf")), key_ok


# ----------------------------------------------------------------------------------------------
# Kernels: q, k, v and o-like tensors are (batch, heads, seq, head_dim), or (total, heads, head_dim)
# if IS_VARLEN, with (batch (0 if varlen), token, head) strides stride_q* (q, k, v) and stride_o* (the
# others); LSE, DELTA (heads, rows) fp32 with rows = batch * seq or total; CU_SEQLENS (batch + 1,) int32,
# read if IS_VARLEN; KEY_MASK (batch, seq) int8, 1 = keep, read if HAS_MASK; seqlen the padded length or
# max_seqlen; qk_scale = softmax_scale * log2(e).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, KEY_MASK,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    flash_tile.fwd(Q, K, V, O, LSE, CU_SEQLENS, KEY_MASK, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot,
                   stride_oh, seqlen, n_rows, n_heads, 0, qk_scale, dropout_p, seed, _masked_scores, (),
                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_VARLEN, HAS_MASK, WINDOWED=False, EMPTY_ROWS=True,
                   HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, O, DO, DQ,
    LSE, DELTA,  # saved logsumexp; delta = rowsum(dO * O), written here
    CU_SEQLENS, KEY_MASK,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    seqlen, n_rows, n_heads, softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # BLOCK_M queries
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    flash_tile.bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS, KEY_MASK, stride_qb, stride_qt, stride_qh,
                      stride_ob, stride_ot, stride_oh, seqlen, n_rows, n_heads, 0, softmax_scale, dropout_p, seed,
                      _masked_scores, (), flash_tile.no_score_grad, (), HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                      IS_VARLEN, HAS_MASK, WINDOWED=False, HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, KEY_MASK,
    stride_qb, stride_qt, stride_qh,  # q, k, v
    stride_ob, stride_ot, stride_oh,  # do, dk, dv
    seqlen, n_rows, n_heads, softmax_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # per BLOCK_N keys
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    flash_tile.bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, KEY_MASK, stride_qb, stride_qt, stride_qh,
                        stride_ob, stride_ot, stride_oh, seqlen, n_rows, n_heads, 0, softmax_scale, dropout_p, seed,
                        _masked_scores, (), flash_tile.no_score_grad, (), HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                        IS_VARLEN, HAS_MASK, WINDOWED=False, HAS_DROPOUT=HAS_DROPOUT, UPCAST_DOT=UPCAST_DOT)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
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
    return flash_tile.kernel_flags(q, dropout_p, IS_VARLEN=cu_seqlens is not None, HAS_MASK=key_mask is not None)


def attention_fwd(q, k, v, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    """Launch the forward; returns (out like q, lse (heads, rows) fp32)."""
    is_varlen, batch, heads, seqlen, rows = _geometry(q, cu_seqlens, max_seqlen)
    q, k, v = flash_tile.same_layout(q, k, v)
    out = _empty_out(q, is_varlen)
    lse = torch.empty(heads, rows, dtype=torch.float32, device=q.device)
    block_d, config, _, _ = _config(q.shape[-1])
    strides = (*flash_tile.strides(q, is_varlen), *flash_tile.strides(out, is_varlen))
    flash_tile.launch(_attention_fwd_kernel, config, block_d, seqlen, heads, batch,
                      q, k, v, out, lse, cu_seqlens, key_mask, *strides, seqlen, rows, heads,
                      softmax_scale * flash_tile.LOG2E.value, dropout_p, seed,
                      **_flags(q, cu_seqlens, key_mask, dropout_p))
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    """Launch the backward; returns (dq, dk, dv) laid out like the forward output."""
    is_varlen, batch, heads, seqlen, rows = _geometry(q, cu_seqlens, max_seqlen)
    q, k, v = flash_tile.same_layout(q, k, v)
    dq, dk, dv = (_empty_out(q, is_varlen) for _ in range(3))
    # out and dout are read with dq's strides
    out, dout = (t if t.stride() == dq.stride() else _empty_out(q, is_varlen).copy_(t) for t in (out, dout))
    delta = torch.empty_like(lse)
    block_d, _, dq_config, dkdv_config = _config(q.shape[-1])
    flags = _flags(q, cu_seqlens, key_mask, dropout_p)
    args = (*flash_tile.strides(q, is_varlen), *flash_tile.strides(dq, is_varlen), seqlen, rows, heads,
            softmax_scale, dropout_p, seed)
    flash_tile.launch(_attention_bwd_dq_kernel, dq_config, block_d, seqlen, heads, batch,
                      q, k, v, out, dout, dq, lse, delta, cu_seqlens, key_mask, *args, **flags)
    flash_tile.launch(_attention_bwd_dkdv_kernel, dkdv_config, block_d, seqlen, heads, batch,
                      q, k, v, dout, dk, dv, lse, delta, cu_seqlens, key_mask, *args, by_keys=True, **flags)
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
def attention_triton(q, k, v, attention_mask=None, *, softmax_scale=None, dropout_p=0.0):
    """Padded attention: q, k, v (batch, heads, seq, head_dim); attention_mask None or (batch, seq)
    key-padding mask (nonzero/True = keep). Returns (batch, heads, seq, head_dim)."""
    scale, seed = flash_tile.prepare(q, softmax_scale, dropout_p)
    key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.int8)
    out, _ = _flash_attention_fwd(q, k, v, key_mask, None, q.shape[2], scale, float(dropout_p), seed)
    return out


def varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, dropout_p=0.0):
    """Packed attention: q, k, v (total, heads, head_dim); cu_seqlens int32 (batch + 1,);
    max_seqlen the longest length. Returns (total, heads, head_dim)."""
    scale, seed = flash_tile.prepare(q, softmax_scale, dropout_p)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    out, _ = _flash_attention_fwd(q, k, v, None, cu_seqlens, int(max_seqlen), scale, float(dropout_p), seed)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (kernels/aot.py, tests/aot/test_aot_attention.py)
# ----------------------------------------------------------------------------------------------
def _aot_cases() -> list[tuple]:
    """Each kernel with the config the launchers pick, fp16 and bf16, head dims 32, 64, 128: the
    heaviest variant (padded, key mask, dropout), plus the varlen no-dropout variant (the model's
    inference path) for fp16 head_dim 64."""
    kernels = (("fwd", _attention_fwd_kernel), ("bwd_dq", _attention_bwd_dq_kernel),
               ("bwd_dkdv", _attention_bwd_dkdv_kernel))
    heaviest = dict(IS_VARLEN=False, HAS_MASK=True, HAS_DROPOUT=True, UPCAST_DOT=False)
    variants = [(dtype, head_dim, "mask_dropout", heaviest) for dtype in ("fp16", "bf16") for head_dim in (32, 64, 128)]
    variants.append(("fp16", 64, "varlen", dict(IS_VARLEN=True, HAS_MASK=False, HAS_DROPOUT=False, UPCAST_DOT=False)))
    return flash_tile.aot_cases("attention", kernels, _CONFIGS, variants)


AOT_CASES = _aot_cases()
