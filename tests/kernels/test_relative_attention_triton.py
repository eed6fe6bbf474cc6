"""Triton relative attention against the fp64 reference, forward and every gradient (q, k, v, q_rel,
k_rel, and MPNet's table behind a stride-0 q_rel).

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels (CPU interpreter), or on a CUDA machine.
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert.kernels.host import triton_interpreting
from fastbert.ops.relative_attention import relative_attention, relative_attention_ref
from tests.helpers import ATOL, check_against_reference

# As for kernels/attention.py: bf16 tl.dot is inexact under the interpreter; bf16 runs on CUDA (and AOT).
DTYPES = [torch.float32, torch.float16] + ([] if triton_interpreting() else [torch.bfloat16])

# Lengths: empty, single token, shorter and longer than the interpreter's 16-row tiles.
LENGTHS = [[5, 0, 1, 33, 17]]
BUCKETS = 7


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _index(max_seqlen, device, buckets=BUCKETS):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, buckets, (2 * max_seqlen - 1,), generator=generator).to(device)


def _with_table(q_rel, table, total):
    """MPNet's q_rel: the (buckets, heads) table as a stride-0 (total, heads, buckets) view."""
    return table.t()[None].expand(total, *table.t().shape) if table is not None else q_rel


@pytest.mark.parametrize("terms", ["both", "q_rel", "k_rel", "table"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relative_attention_matches_fp64_reference(device, dtype, lengths, terms):
    total, max_seqlen = sum(lengths), max(lengths)
    cu, index = _cu_seqlens(lengths, device), _index(max_seqlen, device)
    q, k, v = (torch.randn(total, 2, 16, device=device, dtype=dtype) for _ in range(3))
    q_rel, k_rel = (torch.randn(total, 2, BUCKETS, device=device, dtype=dtype) for _ in range(2))
    table = torch.randn(BUCKETS, 2, device=device, dtype=dtype)
    use = {"both": (q_rel, k_rel, None), "q_rel": (q_rel, None, None), "k_rel": (None, k_rel, None),
           "table": (None, None, table)}[terms]

    def fast(q, k, v, q_rel, k_rel, table):
        with fastbert.use_backend("triton"):
            return relative_attention(q, k, v, cu, max_seqlen, index, q_rel=_with_table(q_rel, table, total),
                                      k_rel=k_rel)

    def reference(q, k, v, q_rel, k_rel, table):
        return relative_attention_ref(q, k, v, cu, max_seqlen, index, q_rel=_with_table(q_rel, table, total),
                                      k_rel=k_rel)

    check_against_reference(fast, reference, [q, k, v, *use], ATOL[dtype],
                            names=["q", "k", "v", "q_rel", "k_rel", "table"])


def test_qkv_views_odd_head_dim_and_many_buckets(device):
    """q, k, v as views of one packed (tokens, 3, heads, head_dim) buffer, head_dim 24 (padded tile),
    512 buckets (DeBERTa-v3) in DeBERTa's layout (per-head GEMM output transposed: (heads, tokens,
    buckets) memory), max_seqlen above the longest sequence, an explicit scale."""
    lengths = [20, 9]
    cu, index = _cu_seqlens(lengths, device), _index(24, device, buckets=512)
    q, k, v = torch.randn(29, 3, 3, 24, device=device).unbind(1)
    q_rel, k_rel = (torch.randn(3, 29, 512, device=device).transpose(0, 1) for _ in range(2))
    with fastbert.use_backend("triton"):
        fast = relative_attention(q, k, v, cu, 24, index, q_rel=q_rel, k_rel=k_rel, softmax_scale=0.3)
    expected = relative_attention_ref(*(t.double() for t in (q, k, v)), cu, 24, index, q_rel=q_rel.double(),
                                      k_rel=k_rel.double(), softmax_scale=0.3)
    assert (fast.double() - expected).abs().max().item() < 1e-5


def test_dropout_drops_probabilities_and_backward_matches_its_mask(device):
    """With all-ones v the output is the kept probability mass / (1 - p): not 1 everywhere, mean ~1.
    The backward regenerates the forward's mask: d out / d v from a ones upstream gradient is, per
    key, the column sum of the kept, rescaled probabilities, whose total equals the output's total."""
    lengths = [40, 24]
    cu, index = _cu_seqlens(lengths, device), _index(40, device)
    q, k = (torch.randn(64, 1, 16, device=device) for _ in range(2))
    q_rel, k_rel = (torch.randn(64, 1, BUCKETS, device=device) for _ in range(2))
    v = torch.ones(64, 1, 16, device=device, requires_grad=True)
    with fastbert.use_backend("triton"):
        out = relative_attention(q, k, v, cu, 40, index, q_rel=q_rel, k_rel=k_rel, dropout_p=0.5)
    assert (out - 1).abs().max().item() > 0.1
    assert abs(out.mean().item() - 1) < 0.2
    out.backward(torch.ones_like(out))
    # sum over keys of d out / d v (any one feature) == sum over queries of the kept mass == out's sum
    assert abs(v.grad[:, 0, 0].sum().item() - out[:, 0, 0].sum().item()) < 1e-3


def test_opcheck_and_compile_without_graph_breaks(device):
    """The custom ops' fake and autograd registrations (opcheck), and torch.compile through forward and
    backward in one graph, MPNet's stride-0 q_rel included."""
    from fastbert.kernels.relative_attention import relative_attention_triton

    torch.manual_seed(0)
    cu, index = _cu_seqlens([5, 7], device), _index(7, device)
    q, k, v = (torch.randn(12, 2, 16, device=device, requires_grad=True) for _ in range(3))
    q_rel, k_rel = (torch.randn(12, 2, BUCKETS, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.fastbert.triton_relative_attention_fwd.default,
                          (q, k, v, cu, 7, index.int(), q_rel, k_rel, 0.25, 0.0, None))

    table = torch.randn(BUCKETS, 2, device=device, requires_grad=True)

    def step(q, k, v, table, k_rel):
        out = relative_attention_triton(q, k, v, cu, 7, index, q_rel=_with_table(None, table, 12), k_rel=k_rel)
        return (out * out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [q, k, v, table, k_rel]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(step(*leaves), leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
