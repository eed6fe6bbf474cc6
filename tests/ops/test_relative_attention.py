"""relative_attention: the reference against an independent per-pair formula (fp64), and the "torch"
backend against the reference, forward and every gradient (q, k, v, q_rel, k_rel), fp32 and bf16.

Tolerances: tests.helpers' rule, err(fast, fp64 ref) <= 2 * err(reference in the same dtype, fp64 ref)
+ ATOL[dtype] (fp32 1e-5, bf16 1e-2), on the output and on every gradient."""
from __future__ import annotations

import math

import pytest
import torch

import fastbert
from fastbert.ops.relative_attention import relative_attention, relative_attention_ref
from tests.helpers import ATOL, check_against_reference

# Lengths: very different ones in one batch, a single token, an empty sequence.
LENGTHS = [[5, 17, 1, 40, 0, 33], [1], [64], [0, 3], [100, 2]]
BUCKETS = 9
HEADS, HEAD_DIM = 2, 8


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _index(max_seqlen, buckets=BUCKETS, seed=0):
    """A random distance -> bucket table (not monotone: a wrong distance picks a wrong bucket)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, buckets, (2 * max_seqlen - 1,), generator=generator)


def _inputs(lengths, dtype=torch.float32, buckets=BUCKETS):
    total = sum(lengths)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, dtype=dtype) for _ in range(3))
    q_rel, k_rel = (torch.randn(total, HEADS, buckets, dtype=dtype) for _ in range(2))
    table = torch.randn(buckets, HEADS, dtype=dtype)  # MPNet: one bias per (bucket, head)
    return q, k, v, q_rel, k_rel, table


def _broadcast(table, total):
    """MPNet's q_rel: the (buckets, heads) table as a stride-0 (total, heads, buckets) view."""
    return table.t()[None].expand(total, *table.t().shape)


def _pair_formula(q, k, v, cu_seqlens, max_seqlen, index, q_rel, k_rel, scale):
    """The op's definition written per query and key, in plain Python loops over pairs."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(start, end):
            scores = []
            for j in range(start, end):
                bucket = int(index[(i - start) - (j - start) + max_seqlen - 1])
                score = (q[i] * k[j]).sum(-1) * scale  # (heads,)
                if q_rel is not None:
                    score = score + q_rel[i, :, bucket]
                if k_rel is not None:
                    score = score + k_rel[j, :, bucket]
                scores.append(score)
            probs = torch.softmax(torch.stack(scores), dim=0)  # over keys, per head
            out[i] = sum(p[:, None] * v[j] for p, j in zip(probs, range(start, end)))
    return out


@pytest.mark.parametrize("terms", ["none", "q_rel", "k_rel", "both", "table", "table_and_k_rel"])
def test_reference_matches_a_per_pair_formula(terms):
    lengths, max_seqlen = [6, 1, 0, 9], 11  # max_seqlen above the longest: index is read at an offset
    cu = _cu_seqlens(lengths)
    q, k, v, q_rel, k_rel, table = (t.double() for t in _inputs(lengths))
    index = _index(max_seqlen)
    rel = {"none": (None, None), "q_rel": (q_rel, None), "k_rel": (None, k_rel), "both": (q_rel, k_rel),
           "table": (_broadcast(table, sum(lengths)), None),
           "table_and_k_rel": (_broadcast(table, sum(lengths)), k_rel)}[terms]
    out = relative_attention_ref(q, k, v, cu, max_seqlen, index, q_rel=rel[0], k_rel=rel[1], softmax_scale=0.7)
    expected = _pair_formula(q, k, v, cu, max_seqlen, index, *rel, 0.7)
    assert (out - expected).abs().max().item() < 1e-12


def _run_torch_backend(q, k, v, cu, max_seqlen, index, q_rel, k_rel, table):
    if table is not None:
        q_rel = _broadcast(table, q.shape[0])
    with fastbert.use_backend("torch"):
        return relative_attention(q, k, v, cu, max_seqlen, index, q_rel=q_rel, k_rel=k_rel)


def _run_reference(q, k, v, cu, max_seqlen, index, q_rel, k_rel, table):
    if table is not None:
        q_rel = _broadcast(table, q.shape[0])
    return relative_attention_ref(q, k, v, cu, max_seqlen, index, q_rel=q_rel, k_rel=k_rel)


@pytest.mark.parametrize("terms", ["both", "q_rel", "k_rel", "none", "table", "table_and_k_rel"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_matches_reference_forward_and_gradients(dtype, lengths, terms):
    """DeBERTa's terms (q_rel and k_rel rows), each alone, none, and MPNet's table (gradient of the table)."""
    cu, max_seqlen = _cu_seqlens(lengths), max(lengths)
    index = _index(max_seqlen)
    q, k, v, q_rel, k_rel, table = _inputs(lengths, dtype)
    use = {"both": (q_rel, k_rel, None), "q_rel": (q_rel, None, None), "k_rel": (None, k_rel, None),
           "none": (None, None, None), "table": (None, None, table), "table_and_k_rel": (None, k_rel, table)}[terms]

    def fast(q, k, v, q_rel, k_rel, table):
        return _run_torch_backend(q, k, v, cu, max_seqlen, index, q_rel, k_rel, table)

    def reference(q, k, v, q_rel, k_rel, table):
        return _run_reference(q, k, v, cu, max_seqlen, index, q_rel, k_rel, table)

    check_against_reference(fast, reference, [q, k, v, *use], ATOL[dtype],
                            names=["q", "k", "v", "q_rel", "k_rel", "table"])


def test_torch_backend_is_the_auto_choice_on_cpu():
    q, k, v, q_rel, k_rel, _ = _inputs([4])
    assert fastbert.backend.resolved_backend("relative_attention", q, head_dim=HEAD_DIM) == "torch"
    assert fastbert.backend.resolved_backend("relative_attention", q, head_dim=HEAD_DIM, grad=True) == "torch"


def test_deberta_sized_buckets_and_default_scale():
    """512 buckets (DeBERTa-v3: 2 * 256) in DeBERTa's layout (its per-head GEMM output transposed:
    (heads, tokens, buckets) memory) and softmax_scale None (1 / sqrt(head_dim)), fp64 end to end."""
    lengths = [30, 7]
    cu = _cu_seqlens(lengths)
    q, k, v, q_rel, k_rel, _ = (t.double() for t in _inputs(lengths, buckets=512))
    q_rel, k_rel = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q_rel, k_rel))
    index = _index(30, buckets=512)
    with fastbert.use_backend("torch"):
        out = relative_attention(q, k, v, cu, 30, index, q_rel=q_rel, k_rel=k_rel)
    expected = _pair_formula(q, k, v, cu, 30, index, q_rel, k_rel, 1 / math.sqrt(HEAD_DIM))
    assert (out - expected).abs().max().item() < 1e-12


def test_dropout_drops_probabilities_and_keeps_gradients():
    """dropout_p on the probabilities: with all-ones v every output is the kept mass / (1 - p), so the
    outputs vary around 1 (mean 1) instead of being exactly 1; gradients still reach every input."""
    lengths = [64, 64]
    cu = _cu_seqlens(lengths)
    q, k, _, q_rel, k_rel, _ = _inputs(lengths)
    v = torch.ones_like(q)
    leaves = [t.requires_grad_() for t in (q, k, q_rel, k_rel)]
    torch.manual_seed(0)
    with fastbert.use_backend("torch"):
        out = relative_attention(q, k, v, cu, 64, _index(64), q_rel=q_rel, k_rel=k_rel, dropout_p=0.3)
    assert (out - 1).abs().max().item() > 0.05
    assert abs(out.mean().item() - 1) < 0.05
    (out * torch.randn_like(out)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
def test_arguments_are_checked_and_named(backend_name):
    q, k, v, q_rel, k_rel, _ = _inputs([4])
    cu, index = _cu_seqlens([4]), _index(4)
    with fastbert.use_backend(backend_name):
        with pytest.raises(ValueError, match="q, k, v must be"):
            relative_attention(q, k[:, :1], v, cu, 4, index)
        with pytest.raises(TypeError, match="q, k, v must have one dtype"):
            relative_attention(q, k.double(), v, cu, 4, index)
        with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
            relative_attention(q, k, v, cu.long(), 4, index)
        with pytest.raises(ValueError, match="index must be an integer tensor of length >= 2 \\* max_seqlen - 1 = 7"):
            relative_attention(q, k, v, cu, 4, index[:5])
        with pytest.raises(ValueError, match="index must be an integer"):
            relative_attention(q, k, v, cu, 4, index.float())
        with pytest.raises(ValueError, match="q_rel must be"):
            relative_attention(q, k, v, cu, 4, index, q_rel=q_rel[:, :1])
        with pytest.raises(ValueError, match="k_rel must be"):
            relative_attention(q, k, v, cu, 4, index, k_rel=k_rel[:2])
        with pytest.raises(ValueError, match="dropout_p"):
            relative_attention(q, k, v, cu, 4, index, dropout_p=1.0)
