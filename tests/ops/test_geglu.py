"""geglu against transformers' ModernBertMLP formula in fp64, forward and gradient, and its argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

import fastbert
from fastbert.ops.geglu import geglu, geglu_ref
from tests.helpers import ATOL, assert_close_to_ref, check_against_reference, gelu_formula


def _hf_formula(x, approximate):
    """ModernBertMLP: input, gate = Wi(x).chunk(2); act(input) * gate, act = ACT2FN[hidden_activation]."""
    values, gate = x.chunk(2, dim=-1)
    act = ACT2FN["gelu"] if approximate == "none" else ACT2FN["gelu_pytorch_tanh"]
    return act(values) * gate


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 2), (7, 10), (3, 5, 96)])
def test_geglu_matches_the_transformers_formula_in_fp64(shape, approximate):
    x = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    ours, theirs = geglu(x, approximate), _hf_formula(x, approximate)
    assert (ours - theirs).abs().max().item() < 1e-12
    g = torch.randn_like(ours)
    (ours_grad,), (their_grad,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(theirs, x, g)
    assert (ours_grad - their_grad).abs().max().item() < 1e-12


def geglu_formula(x, approximate="none"):
    """GELU(input) * gate written out in the test (no F.gelu, no geglu_ref), in x's dtype."""
    values, gate = x.chunk(2, dim=-1)
    return gelu_formula(values, approximate) * gate


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_geglu_torch_backend_against_fp64(dtype, approximate):
    # The torch backend returns geglu_ref when autograd records: both are checked against the formula.
    x = 2 * torch.randn(33, 64, dtype=dtype)
    with fastbert.use_backend("torch"):
        for fn in (geglu, geglu_ref):
            check_against_reference(lambda t, fn=fn: fn(t, approximate), lambda t: geglu_formula(t, approximate), [x],
                                    ATOL[dtype], names=["x"])
        with torch.no_grad():  # the in-place path taken without autograd
            out = geglu(x, approximate)
        assert_close_to_ref(out, geglu_formula(x, approximate), geglu_formula(x.double(), approximate), name="no-grad")


def test_geglu_half_inputs_compute_in_fp32():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    values, gate = x.float().chunk(2, dim=-1)
    assert torch.equal(geglu_ref(x), (F.gelu(values) * gate).to(torch.bfloat16))


def test_geglu_rejects_odd_width_and_unknown_approximation():
    with pytest.raises(ValueError, match="must be even"):
        geglu(torch.randn(2, 5))
    with pytest.raises(ValueError, match="approximate must be one of"):
        geglu(torch.randn(2, 4), "fast")


def test_geglu_without_autograd_equals_the_reference():
    x = torch.randn(5, 3, 40)
    with torch.no_grad(), fastbert.use_backend("torch"):
        assert torch.equal(geglu(x), geglu_ref(x))
        assert torch.equal(geglu(x, "tanh"), geglu_ref(x, "tanh"))
