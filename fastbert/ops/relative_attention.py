"""relative_attention: self-attention on packed tokens with relative-position terms in the scores.

The scores of query i and key j of one sequence are

    softmax_scale * q_i . k_j  +  q_rel[i, h, index[i - j + L - 1]]  +  k_rel[j, h, index[i - j + L - 1]]

where L = max_seqlen and `index` maps each relative distance i - j (from -(L-1) to L-1) to a bucket.
Both families fastbert runs this way fit: MPNet adds one learned bias per (bucket, head), shared by
every query (q_rel is that table broadcast over tokens, a stride-0 view; no k_rel); DeBERTa adds its
content-to-position term (q_rel = scaled q . pos_key of every bucket) and its position-to-content term
(k_rel = scaled k . pos_query of every bucket). The terms are gathered per query/key pair, never
materialized as a (seq x seq) tensor except in the reference.

q, k, v: (total_tokens, heads, head_dim); cu_seqlens: int32 (batch+1,); q_rel, k_rel: (total_tokens,
heads, buckets) or None; index: integer (2 * max_seqlen - 1,), values in [0, buckets).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert.ops._dispatch import compute_dtype, implementation
from fastbert.ops._shared import packed_attention_ref, register_torch_and_triton, triton_attention_problem
from fastbert.ops.attention import check_packed


def pair_buckets(index: torch.Tensor, length: int, max_seqlen: int) -> torch.Tensor:
    """(length, length) bucket of each (query i, key j) pair of one sequence: index[i - j + L - 1]."""
    position = torch.arange(length, device=index.device)
    return index[(position[:, None] - position[None, :]) + (max_seqlen - 1)].long()


def relative_scores(one_q_rel, one_k_rel, buckets: torch.Tensor) -> torch.Tensor | float:
    """(heads, length, length) relative terms of one sequence; rel tensors (length, heads, buckets)."""
    terms = 0.0
    length = buckets.shape[0]
    if one_q_rel is not None:  # term[h, i, j] = q_rel[i, h, buckets[i, j]]
        rows = one_q_rel.permute(1, 0, 2)  # (heads, i, buckets)
        terms = terms + torch.gather(rows, 2, buckets[None].expand(rows.shape[0], length, length))
    if one_k_rel is not None:  # term[h, i, j] = k_rel[j, h, buckets[i, j]]
        cols = one_k_rel.permute(1, 0, 2)  # (heads, j, buckets)
        picked = torch.gather(cols, 2, buckets.t()[None].expand(cols.shape[0], length, length))  # [h, j, i]
        terms = terms + picked.transpose(1, 2)
    return terms


def relative_attention_ref(q, k, v, cu_seqlens, max_seqlen, index, *, q_rel=None, k_rel=None,
                           softmax_scale=None, dropout_p=0.0):
    """Reference: explicit scores, relative terms and softmax, one sequence at a time."""
    math_dtype = compute_dtype(q.dtype)

    def add_relative_terms(scores, start, end):
        buckets = pair_buckets(index, end - start, int(max_seqlen))
        rel = [None if t is None else t[start:end].to(math_dtype) for t in (q_rel, k_rel)]
        return scores + relative_scores(*rel, buckets)

    return packed_attention_ref(q, k, v, cu_seqlens, softmax_scale=softmax_scale, dropout_p=dropout_p,
                                adjust_scores=add_relative_terms)


def _sequence_terms(buckets, table, one_q_rel, one_k_rel, math_dtype):
    """(heads, n, n) relative terms of one sequence: the shared table's slice plus the gathered rows."""
    n = buckets.shape[0]
    rel = [None if t is None else t.to(math_dtype) for t in (one_q_rel, one_k_rel)]
    terms = relative_scores(*rel, buckets)
    if table is not None:
        shared = table if table.shape[-1] == n else table[:, :n, :n]  # a slice costs a zero fill in backward
        terms = terms + shared if torch.is_tensor(terms) else shared
    return terms


def _relative_attention_split(q, k, v, cu_seqlens, max_seqlen, index, *, q_rel=None, k_rel=None,
                              softmax_scale=None, dropout_p=0.0):
    """The "torch" backend: explicit scores per sequence, in fp32 (fp64 stays fp64).

    Picked by measurement on CPU (12 heads, head_dim 64; 8 sequences of 44-112 tokens and 1 x 128; fp32
    and bf16; MPNet's table and DeBERTa's 512-bucket c2p + p2c): SDPA with the terms as attn_mask,
    per sequence or on one padded batch with -inf keys, was no faster forward and slower in training
    (a mask that needs a gradient takes SDPA's math path). What makes this fast is how sequences
    are cut: `split` (its backward is one cat), not per-sequence slicing as the reference does, whose
    backward fills a zero tensor of the whole input per sequence, O(batch x tokens x heads x buckets)
    for q_rel/k_rel: 6x the reference's forward+backward time at DeBERTa's shape. The pair buckets
    are built once for the longest sequence; MPNet's stride-0 q_rel is one (heads, buckets) table,
    looked up once into (heads, P, P) and sliced per sequence.
    """
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if not lengths or max(lengths) == 0:
        return q.new_zeros(q.shape)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    math_dtype = compute_dtype(q.dtype)
    buckets = pair_buckets(index, max(lengths), int(max_seqlen))
    table = None
    if q_rel is not None and q_rel.stride(0) == 0:  # one row for every token: look the table up once
        rows = q_rel[0].to(math_dtype)  # (heads, buckets); index_select's backward beats indexing's 4x
        table, q_rel = rows.index_select(1, buckets.flatten()).view(-1, *buckets.shape), None
    covered = slice(bounds[0], bounds[-1])
    whole = (bounds[0], bounds[-1]) == (0, q.shape[0])  # no slice: its backward would fill a zero tensor
    pieces = [None if t is None else (t if whole else t[covered]).split(lengths) for t in (q, k, v, q_rel, k_rel)]
    outputs = []
    for number, length in enumerate(lengths):
        one_q, one_k, one_v, one_q_rel, one_k_rel = (None if p is None else p[number] for p in pieces)
        terms = _sequence_terms(buckets[:length, :length], table, one_q_rel, one_k_rel, math_dtype)
        one_q, one_k, one_v = (t.transpose(0, 1).to(math_dtype) for t in (one_q, one_k, one_v))
        if torch.is_tensor(terms):
            scores = torch.baddbmm(terms, one_q, one_k.transpose(1, 2), alpha=scale)
        else:  # neither q_rel nor k_rel
            scores = torch.bmm(one_q, one_k.transpose(1, 2)) * scale
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        outputs.append(torch.bmm(probs, one_v).transpose(0, 1))
    return torch.cat(outputs).to(q.dtype)


register_torch_and_triton(
    "relative_attention", "fastbert.ops.relative_attention:_relative_attention_split",
    "fastbert.kernels.relative_attention:relative_attention_triton", triton_supports=triton_attention_problem,
)


def _check_arguments(q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, dropout_p) -> None:
    check_packed(q, k, v, cu_seqlens, max_seqlen, dropout_p)
    span = 2 * int(max_seqlen) - 1
    if index.dim() != 1 or index.numel() < span or index.is_floating_point():
        raise ValueError(f"index must be an integer tensor of length >= 2 * max_seqlen - 1 = {span}, "
                         f"got dtype {index.dtype} shape {tuple(index.shape)}")
    for name, rel in (("q_rel", q_rel), ("k_rel", k_rel)):
        if rel is not None and (rel.dim() != 3 or rel.shape[:2] != q.shape[:2]):
            raise ValueError(f"{name} must be (total_tokens, heads, buckets) = ({q.shape[0]}, {q.shape[1]}, "
                             f"buckets), got {tuple(rel.shape)}")


def relative_attention(q, k, v, cu_seqlens, max_seqlen, index, *, q_rel=None, k_rel=None,
                       softmax_scale=None, dropout_p=0.0):
    """Self-attention on packed tokens with relative-position terms (see the module docstring).
    Returns q's shape."""
    _check_arguments(q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, dropout_p)
    grad = backend.records_autograd(q, k, v, *(t for t in (q_rel, k_rel) if t is not None))
    run = implementation("relative_attention", q, head_dim=q.shape[-1], grad=grad)
    return run(q, k, v, cu_seqlens, int(max_seqlen), index, q_rel=q_rel, k_rel=k_rel,
               softmax_scale=softmax_scale, dropout_p=dropout_p)
