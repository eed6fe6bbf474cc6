"""Triton rotary against the fp64 reference, forward and gradient.

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels (CPU interpreter), or on a CUDA machine.
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert.ops.rotary import rotary, rotary_ref
from tests.helpers import ATOL, check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens, heads, head_dim): one token, odd head counts (padded tile), ModernBERT-base's heads.
SHAPES = [(1, 1, 2), (7, 3, 16), (33, 12, 64), (5, 2, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_matches_fp64_reference(device, dtype, shape):
    tokens, heads, head_dim = shape
    angles = torch.rand(tokens, head_dim // 2, device=device, dtype=torch.float64) * 300
    cos, sin = angles.cos().float(), angles.sin().float()
    qkv = torch.randn(tokens, 3, heads, head_dim, device=device, dtype=dtype)

    def fast(t):
        with fastbert.use_backend("triton"):
            return rotary(t, cos, sin)

    check_against_reference(fast, lambda t: rotary_ref(t, cos, sin), [qkv], ATOL[dtype], names=["qkv"])


def test_rotary_strided_input(device):
    """q/k/v views of a wider buffer are copied to the contiguous layout the kernel reads."""
    wide = torch.randn(6, 3, 2, 16, 2, device=device)[..., 0]
    angles = torch.rand(6, 8, device=device)
    with fastbert.use_backend("triton"):
        fast = rotary(wide, angles.cos(), angles.sin())
    assert torch.allclose(fast, rotary_ref(wide, angles.cos(), angles.sin()), atol=1e-6)
