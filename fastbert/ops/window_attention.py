"""window_attention: self-attention on packed tokens where each query sees only the keys of its own
sequence within `window` positions of it (|query - key| <= window, inclusive, as transformers'
create_bidirectional_sliding_window_mask with config.sliding_window = local_attention // 2).

q, k, v are (total_tokens, heads, head_dim) described by int32 cu_seqlens, as for varlen_attention.
Cost O(tokens x window), not O(tokens x length): the "torch" implementation cuts every sequence into
query blocks and runs each block against its key band only (block + 2 * window keys), all blocks of
all sequences in one batched SDPA call with a band mask (see `BandPlan`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert.ops._dispatch import implementation
from fastbert.ops._shared import packed_attention_ref, register_torch_and_triton, triton_attention_problem
from fastbert.ops.attention import check_packed
from fastbert.ops.tensor_memo import TensorMemo


def _band_mask(length: int, window: int, device) -> torch.Tensor:
    position = torch.arange(length, device=device)
    return (position[:, None] - position[None, :]).abs() <= window


def window_attention_ref(q, k, v, cu_seqlens, max_seqlen, window, *, softmax_scale=None, dropout_p=0.0):
    """Reference: explicit softmax over each whole sequence with the band mask, one sequence at a time."""

    def mask_band(scores, start, end):
        return scores.masked_fill(~_band_mask(end - start, window, q.device), float("-inf"))

    return packed_attention_ref(q, k, v, cu_seqlens, softmax_scale=softmax_scale, dropout_p=dropout_p,
                                adjust_scores=mask_band)


def block_size(window: int) -> int:
    """Query rows per block: the window rounded up to a power of two, 16..64. A block of b rows reads
    b + 2 * window keys, so per query b / (2 * window) of the work is outside the band."""
    return min(64, max(16, 1 << max(window - 1, 0).bit_length()))


class BandPlan:
    """Blocks of `block` consecutive packed tokens (across sequence boundaries), each against its key
    band: the tokens from window before its first row to window after its last. Built from cu_seqlens
    alone, so every local layer of one forward shares it (see `plan_for`).

    Interior blocks [first, stop) have their whole band inside the packed tokens: their queries are a
    view and their bands an unfold view of k and v (no copy). The edge blocks (the first ones, whose
    band starts before token 0, and the last ones, whose band or rows run past the end) gather their
    rows, clamped into range. mask (blocks, 1, block, band), additive 0 / -inf: query row may attend to
    band slot (a real token of the same sequence within |distance| <= window); rows past the end may
    attend to every slot (finite math; they are dropped).
    """

    def __init__(self, cu_seqlens: torch.Tensor, total: int, window: int, block: int, dtype: torch.dtype):
        device = cu_seqlens.device
        self.total, self.window, self.block, self.band = total, window, block, block + 2 * window
        self.blocks = (total + block - 1) // block
        self.first = min(self.blocks, (window + block - 1) // block)
        self.stop = max(self.first, (total - window) // block) if total >= window else self.first
        lengths = cu_seqlens.diff().long()
        sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total)
        query = torch.arange(self.blocks, device=device)[:, None] * block + torch.arange(block, device=device)
        key = query[:, :1] - window + torch.arange(self.band, device=device)
        query_ok, key_ok = query < total, (key >= 0) & (key < total)
        last = max(total - 1, 0)
        self.query_rows, self.key_rows = query.clamp(max=last), key.clamp(0, last)
        same = sequence[self.query_rows][:, :, None] == sequence[self.key_rows][:, None, :]
        near = (query[:, :, None] - key[:, None, :]).abs() <= window
        allowed = (same & near & key_ok[:, None, :]) | ~query_ok[:, :, None]
        self.mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))[:, None]
        edges = torch.cat([torch.arange(self.first), torch.arange(self.stop, self.blocks)]).to(device)
        self.edge_blocks = edges

    def interior(self, q, k, v):
        """(queries, keys, values, mask) of the interior blocks: views, (n, heads, rows, head_dim)."""
        block, window, band = self.block, self.window, self.band
        rows = slice(self.first * block, self.stop * block)
        n, heads, head_dim = self.stop - self.first, q.shape[1], q.shape[2]
        queries = q[rows].view(n, block, heads, head_dim).transpose(1, 2)
        span = slice(self.first * block - window, self.stop * block + window)

        def bands(t):  # (n, heads, band, head_dim), overlapping windows of one tensor
            return t[span].unfold(0, band, block).permute(0, 1, 3, 2)

        return queries, bands(k), bands(v), self.mask[self.first:self.stop]

    def edges(self, q, k, v):
        """(queries, keys, values, mask) of the edge blocks, gathered."""
        heads, head_dim = q.shape[1], q.shape[2]

        def gather(t, rows):  # (blocks, heads, rows, head_dim)
            picked = rows[self.edge_blocks]
            return t.index_select(0, picked.flatten()).view(*picked.shape, heads, head_dim).transpose(1, 2)

        keys = self.key_rows
        return gather(q, self.query_rows), gather(k, keys), gather(v, keys), self.mask[self.edge_blocks]


_plans = TensorMemo()


def plan_for(cu_seqlens: torch.Tensor, total: int, window: int, dtype: torch.dtype = torch.float32) -> BandPlan:
    """The BandPlan of this cu_seqlens tensor (memoized on the tensor, its version, the window and dtype)."""
    key = (total, window, dtype)
    plan = _plans.get(cu_seqlens, key)
    if plan is None:
        plan = _plans.put(cu_seqlens, key, BandPlan(cu_seqlens, total, window, block_size(window), dtype))
    return plan


def _window_attention_blocks(q, k, v, cu_seqlens, max_seqlen, window, *, softmax_scale=None, dropout_p=0.0):
    """The "torch" backend: blocks of queries against their key bands, batched masked SDPA calls."""
    total, heads, head_dim = q.shape
    if total == 0:
        return q.new_zeros(q.shape)
    plan = plan_for(cu_seqlens, total, window, q.dtype)

    def attend(queries, keys, values, mask):  # -> (blocks * block, heads, head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout_p,
                                             scale=softmax_scale)
        return out.transpose(1, 2).reshape(-1, heads, head_dim)

    edges = attend(*plan.edges(q, k, v)) if plan.edge_blocks.numel() else q[:0]
    interior = attend(*plan.interior(q, k, v)) if plan.stop > plan.first else q[:0]
    # Edge rows: the first blocks' rows, then the last blocks' up to the last token.
    front = plan.first * plan.block
    back = max(0, total - plan.stop * plan.block) if plan.stop < plan.blocks else 0
    return torch.cat([edges[:min(front, total)], interior, edges[front:front + back]])


register_torch_and_triton(
    "window_attention", "fastbert.ops.window_attention:_window_attention_blocks",
    "fastbert.kernels.window_attention:window_attention_triton", triton_supports=triton_attention_problem,
)
# Until the hand-kept order in fastbert/backend.py names this op: Triton first on CUDA.


def _check_arguments(q, k, v, cu_seqlens, max_seqlen, window: int, dropout_p: float) -> None:
    check_packed(q, k, v, cu_seqlens, max_seqlen, dropout_p)
    if int(window) < 0:
        raise ValueError(f"window must be >= 0 (keys at |distance| <= window), got {window}")


def window_attention(q, k, v, cu_seqlens, max_seqlen, window, *, softmax_scale=None, dropout_p=0.0):
    """Sliding-window self-attention on packed tokens: query i of a sequence attends to the keys j of
    that sequence with |i - j| <= window. q, k, v: (total_tokens, heads, head_dim); cu_seqlens: int32
    (batch+1,); max_seqlen: the longest length. Returns q's shape."""
    _check_arguments(q, k, v, cu_seqlens, max_seqlen, window, dropout_p)
    grad = backend.records_autograd(q, k, v)
    run = implementation("window_attention", q, head_dim=q.shape[-1], grad=grad)
    return run(q, k, v, cu_seqlens, int(max_seqlen), int(window), softmax_scale=softmax_scale, dropout_p=dropout_p)
