"""Triton bias_gelu against the fp64 reference, forward and every gradient.

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels (CPU interpreter), or on a CUDA machine.
"""
from __future__ import annotations

import functools

import pytest
import torch

import fastbert
from fastbert.ops.bias_gelu import bias_gelu_ref
from tests.helpers import ATOL, check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, has_bias): odd widths, one row, many rows (several programs, uneven split), 3-D, no bias.
CASES = [((1, 1), False), ((4, 1), True), ((5, 7), True), ((129, 33), True), ((2, 3, 1000), True),
         ((2, 3072), True), ((3, 5, 7), False)]


def _fast(x, bias, approximate):
    with fastbert.use_backend("triton"):
        return fastbert.ops.bias_gelu(x, bias, approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,has_bias", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_matches_fp64_reference(device, dtype, shape, has_bias, approximate):
    x = 2 * torch.randn(shape, device=device, dtype=dtype)
    bias = torch.randn(shape[-1], device=device, dtype=dtype) if has_bias else None
    check_against_reference(
        lambda x, b: _fast(x, b, approximate), lambda x, b: bias_gelu_ref(x, b, approximate),
        [x, bias], ATOL[dtype], names=["x", "bias"])


def test_bias_gelu_non_contiguous_input_and_fp32_bias(device):
    # A transposed (strided) x and a bias in a wider dtype than x (autocast-style).
    x = torch.randn(33, 6, device=device, dtype=torch.bfloat16).t()
    bias = torch.randn(33, device=device, dtype=torch.float32)
    check_against_reference(lambda x, b: _fast(x, b, "none"), lambda x, b: bias_gelu_ref(x, b, "none"),
                            [x, bias], ATOL[torch.bfloat16], names=["x", "bias"])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_bias_gelu_large_inputs_saturate(device):
    # Large |x| must not overflow the exp-based tanh or produce NaN in the backward.
    x = torch.tensor([[-60.0, -12.0, -3.0, 0.5, 3.0, 12.0, 60.0]], device=device)
    for approximate in ("none", "tanh"):
        check_against_reference(functools.partial(_fast, bias=None, approximate=approximate),
                                functools.partial(bias_gelu_ref, bias=None, approximate=approximate),
                                [x], ATOL[torch.float32])


def test_bias_gelu_registered_ops_pass_opcheck(device):
    from fastbert.kernels.bias_gelu import _bias_gelu_fwd_op

    x = torch.randn(3, 17, device=device, requires_grad=True)
    bias = torch.randn(17, device=device, requires_grad=True)
    torch.library.opcheck(_bias_gelu_fwd_op, (x, bias, "tanh"))


def test_bias_gelu_traces_without_graph_breaks(device):
    # The kernel entry itself (fastbert.ops dispatch is traced separately, in tests/ops).
    from fastbert.kernels.bias_gelu import bias_gelu_triton

    compiled = torch.compile(lambda x, b: bias_gelu_triton(x, b, "none").sum(), backend="aot_eager",
                             fullgraph=True)
    x = torch.randn(4, 9, device=device, requires_grad=True)
    bias = torch.randn(9, device=device, requires_grad=True)
    compiled(x, bias).backward()
    assert x.grad is not None and bias.grad is not None
