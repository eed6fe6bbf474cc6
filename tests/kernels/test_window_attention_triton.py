"""Triton window attention against the fp64 reference, forward and every gradient.

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels (CPU interpreter), or on a CUDA machine.
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert.kernels.host import triton_interpreting
from fastbert.ops.window_attention import window_attention, window_attention_ref
from tests.helpers import ATOL, check_against_reference

# As for kernels/attention.py: bf16 tl.dot is inexact under the interpreter; bf16 runs on CUDA (and AOT).
DTYPES = [torch.float32, torch.float16] + ([] if triton_interpreting() else [torch.bfloat16])

# Lengths: empty, single token, shorter and longer than the interpreter's 16-row tiles and the window.
LENGTHS = [[5, 0, 1, 40, 33], [64]]


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.mark.parametrize("window", [0, 3, 16, 100])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_attention_matches_fp64_reference(device, dtype, lengths, window):
    cu = _cu_seqlens(lengths, device)
    q, k, v = (torch.randn(sum(lengths), 2, 16, device=device, dtype=dtype) for _ in range(3))

    def fast(q, k, v):
        with fastbert.use_backend("triton"):
            return window_attention(q, k, v, cu, max(lengths), window)

    check_against_reference(fast, lambda q, k, v: window_attention_ref(q, k, v, cu, max(lengths), window),
                            [q, k, v], ATOL[dtype], names=["q", "k", "v"])


def test_window_attention_on_qkv_views_and_odd_head_dim(device):
    """q, k, v as views of one packed (tokens, 3, heads, head_dim) buffer, head_dim 24 (padded tile)."""
    lengths = [20, 9]
    cu = _cu_seqlens(lengths, device)
    qkv = torch.randn(29, 3, 3, 24, device=device)
    q, k, v = qkv.unbind(1)
    with fastbert.use_backend("triton"):
        fast = window_attention(q, k, v, cu, 20, 4, softmax_scale=0.3)
    expected = window_attention_ref(q.double(), k.double(), v.double(), cu, 20, 4, softmax_scale=0.3)
    assert (fast.double() - expected).abs().max().item() < 1e-5


def test_dropout_stays_inside_the_band(device):
    lengths = [40]
    cu = _cu_seqlens(lengths, device)
    q, k = (torch.randn(40, 1, 16, device=device) for _ in range(2))
    v = torch.zeros(40, 1, 16, device=device)
    v[30:] = 1.0
    with fastbert.use_backend("triton"):
        out = window_attention(q, k, v, cu, 40, 2, dropout_p=0.5)
    assert out[:27].abs().max().item() == 0.0
    assert out[28:].abs().max().item() > 0.0
