"""window_attention: self-attention on packed tokens where each query sees only the keys of its own
sequence within `window` positions of it (|query - key| <= window, inclusive, as transformers'
create_bidirectional_sliding_window_mask with config.sliding_window = local_attention // 2).

q, k, v are (total_tokens, heads, head_dim) described by int32 cu_seqlens, as for varlen_attention.
Cost O(tokens x window), not O(tokens x length): the "torch" implementation cuts every sequence into
query blocks and runs each block against its key band only (block + 2 * window keys), all blocks of
all sequences in one batched SDPA call with a band mask (see `BandPlan`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert.backend import REGISTRY, runs_anywhere, triton_probe
from fastbert.kernels import limits as triton_limits
from fastbert.ops._dispatch import compute_dtype, implementation
from fastbert.ops.tensor_memo import TensorMemo
from fastbert.registry import Implementation, Signature


def _band_mask(length: int, window: int, device) -> torch.Tensor:
    position = torch.arange(length, device=device)
    return (position[:, None] - position[None, :]).abs() <= window


def window_attention_ref(q, k, v, cu_seqlens, max_seqlen, window, *, softmax_scale=None, dropout_p=0.0):
    """Reference: explicit softmax over each whole sequence with the band mask, one sequence at a time."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    math_dtype = compute_dtype(q.dtype)
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        one_q, one_k, one_v = (t[start:end].to(math_dtype).transpose(0, 1) for t in (q, k, v))
        scores = torch.matmul(one_q, one_k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~_band_mask(end - start, window, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        outputs.append(torch.matmul(probs, one_v).transpose(0, 1).to(q.dtype))
    return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)


def block_size(window: int) -> int:
    """Query rows per block: the window rounded up to a power of two, 16..64. A block of b rows reads
    b + 2 * window keys, so per query b / (2 * window) of the work is outside the band."""
    return min(64, max(16, 1 << max(window - 1, 0).bit_length()))


class BandPlan:
    """Where each query block and its key band live in the packed tokens. Built from cu_seqlens alone,
    so every local layer of one forward shares it (see `plan_for`).

    query_rows (blocks, block): packed row of each block slot (clamped; `query_ok` marks the real ones);
    key_rows (blocks, block + 2 * window): packed rows of the band (clamped);
    mask (blocks, 1, block, band): query slot may attend to band slot (same sequence, |distance| <= window);
    slots (tokens,): each packed token's slot in the flattened (blocks * block) output.
    """

    def __init__(self, cu_seqlens: torch.Tensor, total: int, window: int, block: int):
        device = cu_seqlens.device
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        blocks_per_sequence = (ends - starts + block - 1) // block
        blocks = int(blocks_per_sequence.sum())
        sequence = torch.repeat_interleave(torch.arange(starts.numel(), device=device), blocks_per_sequence,
                                           output_size=blocks)
        first_block = torch.cumsum(blocks_per_sequence, 0) - blocks_per_sequence
        block_start = starts[sequence] + (torch.arange(blocks, device=device) - first_block[sequence]) * block
        query = block_start[:, None] + torch.arange(block, device=device)
        key = block_start[:, None] - window + torch.arange(block + 2 * window, device=device)
        seq_start, seq_end = starts[sequence][:, None], ends[sequence][:, None]
        query_ok = query < seq_end
        key_ok = (key >= seq_start) & (key < seq_end)
        near = (query[:, :, None] - key[:, None, :]).abs() <= window
        # Padding slots of a last, partial block attend to everything (finite math); they are dropped.
        self.mask = ((near & key_ok[:, None, :]) | ~query_ok[:, :, None])[:, None]
        last = max(total - 1, 0)
        self.query_rows, self.key_rows = query.clamp(0, last), key.clamp(0, last)
        self.slots = torch.nonzero_static(query_ok.flatten(), size=total).flatten()
        self.blocks, self.block = blocks, block


_plans = TensorMemo()


def plan_for(cu_seqlens: torch.Tensor, total: int, window: int) -> BandPlan:
    """The BandPlan of this cu_seqlens tensor (memoized on the tensor, its version and the window)."""
    plan = _plans.get(cu_seqlens, (total, window))
    if plan is None:
        plan = _plans.put(cu_seqlens, (total, window), BandPlan(cu_seqlens, total, window, block_size(window)))
    return plan


def _window_attention_blocks(q, k, v, cu_seqlens, max_seqlen, window, *, softmax_scale=None, dropout_p=0.0):
    """The "torch" backend: every query block against its key band, one batched masked SDPA call."""
    total, heads, head_dim = q.shape
    if total == 0:
        return q.new_zeros(q.shape)
    plan = plan_for(cu_seqlens, total, window)

    def gather(t, rows):  # (tokens, heads, head_dim) -> (blocks, heads, slots, head_dim)
        return t.index_select(0, rows.flatten()).view(*rows.shape, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        gather(q, plan.query_rows), gather(k, plan.key_rows), gather(v, plan.key_rows),
        attn_mask=plan.mask, dropout_p=dropout_p, scale=softmax_scale,
    )
    out = out.transpose(1, 2).reshape(plan.blocks * plan.block, heads, head_dim)
    return out.index_select(0, plan.slots)


def _triton_supports(call: Signature) -> str | None:
    return triton_limits.cpu_problem(call.device, call.interpreting) or triton_limits.attention_head_dim_problem(
        call.head_dim
    )


REGISTRY.register(Implementation(
    op="window_attention", backend="torch", target="fastbert.ops.window_attention:_window_attention_blocks",
    devices=None, dtypes=None, probe=runs_anywhere,
))
REGISTRY.register(Implementation(
    op="window_attention", backend="triton", target="fastbert.kernels.window_attention:window_attention_triton",
    devices=triton_limits.DEVICES, dtypes=triton_limits.DTYPES, probe=triton_probe, supports=_triton_supports,
))
# Until the hand-kept order in fastbert/backend.py names this op: Triton first on CUDA.
REGISTRY.auto_preference.setdefault("cuda", {}).setdefault("window_attention", ("triton", "torch"))


def _check_arguments(q, k, v, cu_seqlens, window: int, dropout_p: float) -> None:
    if q.dim() != 3 or not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must be (total_tokens, heads, head_dim) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of length batch+1, "
                         f"got dtype {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}")
    if int(window) < 0:
        raise ValueError(f"window must be >= 0 (keys at |distance| <= window), got {window}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def window_attention(q, k, v, cu_seqlens, max_seqlen, window, *, softmax_scale=None, dropout_p=0.0):
    """Sliding-window self-attention on packed tokens: query i of a sequence attends to the keys j of
    that sequence with |i - j| <= window. q, k, v: (total_tokens, heads, head_dim); cu_seqlens: int32
    (batch+1,); max_seqlen: the longest length. Returns q's shape."""
    _check_arguments(q, k, v, cu_seqlens, window, dropout_p)
    grad = backend.records_autograd(q, k, v)
    run = implementation("window_attention", q, head_dim=q.shape[-1], grad=grad)
    return run(q, k, v, cu_seqlens, int(max_seqlen), int(window), softmax_scale=softmax_scale, dropout_p=dropout_p)
