"""Triton geglu against the fp64 reference, forward and gradient.

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels (CPU interpreter), or on a CUDA machine.
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert.ops.geglu import geglu, geglu_ref
from tests.helpers import ATOL, check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one row, odd widths, several programs along both axes, 3-D
SHAPES = [(1, 2), (5, 14), (67, 2 * 33), (2, 3, 2 * 1152)]


def _fast(x, approximate):
    with fastbert.use_backend("triton"):
        return geglu(x, approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_geglu_matches_fp64_reference(device, dtype, shape, approximate):
    x = 2 * torch.randn(shape, device=device, dtype=dtype)
    check_against_reference(lambda t: _fast(t, approximate), lambda t: geglu_ref(t, approximate), [x],
                            ATOL[dtype], names=["x"])


def test_geglu_non_contiguous_input(device):
    x = torch.randn(20, 9, device=device).t()  # (9, 20), strided
    assert torch.allclose(_fast(x, "none"), geglu_ref(x), atol=1e-6)
