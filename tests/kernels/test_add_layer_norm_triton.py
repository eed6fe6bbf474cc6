"""Triton add_layer_norm against the fp64 reference, forward and every gradient, dropout included.

Run: TRITON_INTERPRET=1 python -m pytest tests/kernels (CPU interpreter), or on a CUDA machine.
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert.ops._dispatch import compute_dtype
from fastbert.ops.add_layer_norm import add_layer_norm_ref
from tests.helpers import ATOL, check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ["x", "residual", "weight", "bias", "x_bias"]
# (shape, has_residual, has_bias, has_x_bias): odd and BERT widths, 1 row, many rows, 3-D, Nones.
CASES = [((1, 7), True, True, True), ((5, 33), False, False, False), ((2, 3, 384), True, True, False),
         ((129, 33), True, False, True), ((3, 1000), True, True, True), ((2, 1024), False, True, True),
         ((2, 4096), True, True, True), ((4, 1), True, True, False)]
P = 0.5


def _fast(x, residual, weight, bias, x_bias, eps=1e-12, dropout_p=0.0):
    with fastbert.use_backend("triton"):
        return fastbert.ops.add_layer_norm(x, residual, weight, bias, eps, x_bias=x_bias, dropout_p=dropout_p)


def _reference(eps):
    return lambda x, r, w, b, xb: add_layer_norm_ref(x, r, w, b, eps, x_bias=xb)


def _inputs(shape, device, dtype, has_residual=True, has_bias=True, has_x_bias=True):
    width = shape[-1]
    return [torch.randn(shape, device=device, dtype=dtype),
            torch.randn(shape, device=device, dtype=dtype) if has_residual else None,
            torch.randn(width, device=device, dtype=dtype),
            torch.randn(width, device=device, dtype=dtype) if has_bias else None,
            torch.randn(width, device=device, dtype=dtype) if has_x_bias else None]


@pytest.mark.parametrize("shape,has_residual,has_bias,has_x_bias", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm_matches_fp64_reference(device, dtype, shape, has_residual, has_bias, has_x_bias):
    inputs = _inputs(shape, device, dtype, has_residual, has_bias, has_x_bias)
    check_against_reference(_fast, _reference(1e-12), inputs, ATOL[dtype], NAMES)


def test_add_layer_norm_eps_and_mixed_dtypes(device):
    # eps=1e-5, fp32 LayerNorm parameters with a bf16 activation stream (autocast-style).
    x, residual, _, _, _ = _inputs((6, 48), device, torch.bfloat16)
    weight, bias, x_bias = (torch.randn(48, device=device) for _ in range(3))
    check_against_reference(lambda *a: _fast(*a, eps=1e-5), _reference(1e-5),
                            [x, residual, weight, bias, x_bias], ATOL[torch.bfloat16], NAMES)


# Dropout: inputs built so that the mask can be read back from the output. x + x_bias is in [4, 9]
# and the residual in [-1, 1], so kept elements (scaled by 2) sit above 7 and dropped ones below 1; with
# a positive weight, (y - bias) / weight is an increasing affine map of the pre-norm sum per row, and
# the largest gap in each sorted row separates dropped from kept.
def _dropout_inputs(device, dtype, has_residual, rows=48, width=256):
    x = (4 + 4 * torch.rand(rows, width, device=device)).to(dtype)
    x_bias = torch.rand(width, device=device).to(dtype)
    residual = (2 * torch.rand(rows, width, device=device) - 1).to(dtype) if has_residual else None
    weight = (0.5 + torch.rand(width, device=device)).to(dtype)
    return [x, residual, weight, torch.randn(width, device=device, dtype=dtype), x_bias]


def _recover_mask(y, weight, bias):
    z = (y.double() - bias.double()) / weight.double()
    ordered = z.sort(dim=-1).values
    gap = (ordered[:, 1:] - ordered[:, :-1]).argmax(dim=-1, keepdim=True)
    threshold = (ordered.gather(-1, gap) + ordered.gather(-1, gap + 1)) / 2
    return z > threshold


def _masked_reference(mask):
    def reference(x, r, w, b, xb):
        math_dtype = compute_dtype(x.dtype)
        dropped = (x.to(math_dtype) + xb.to(math_dtype)) * mask.to(math_dtype) / (1 - P)
        return add_layer_norm_ref(dropped, r, w, b, 1e-12).to(x.dtype)
    return reference


@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_layer_norm_dropout_mask_scale_and_backward_replay(device, dtype, has_residual):
    inputs = _dropout_inputs(device, dtype, has_residual)
    state = torch.get_rng_state()
    y = _fast(*inputs, dropout_p=P)
    mask = _recover_mask(y, inputs[2], inputs[3])
    kept = mask.double().mean().item()
    assert abs(kept - (1 - P)) < 0.03, f"kept fraction {kept:.3f}, expected {1 - P}"
    # Forward (kept values scaled by 1/(1-p)) and every gradient against the reference with the same
    # mask: the backward must regenerate the forward's mask from the seed. The seed is re-drawn from
    # the same generator state so that the fast run repeats the mask read back above.

    def fast(*args):
        torch.set_rng_state(state)
        return _fast(*args, dropout_p=P)

    check_against_reference(fast, _masked_reference(mask), inputs, ATOL[dtype], NAMES)


def test_add_layer_norm_dropout_differs_between_calls_and_follows_manual_seed(device):
    inputs = _dropout_inputs(device, torch.float32, True)
    first = _recover_mask(_fast(*inputs, dropout_p=P), inputs[2], inputs[3])
    second = _recover_mask(_fast(*inputs, dropout_p=P), inputs[2], inputs[3])
    assert (first != second).double().mean().item() > 0.3
    torch.manual_seed(1234)
    again_a = _fast(*inputs, dropout_p=P)
    torch.manual_seed(1234)
    again_b = _fast(*inputs, dropout_p=P)
    assert torch.equal(again_a, again_b)


def test_add_layer_norm_too_wide_rows_raise_when_chosen_and_fall_back_under_auto(device):
    from fastbert.kernels.limits import LAYER_NORM_MAX_WIDTH as MAX_WIDTH

    x = torch.randn(2, MAX_WIDTH + 1, device=device)
    weight = torch.ones(MAX_WIDTH + 1, device=device)
    with pytest.raises(fastbert.BackendUnavailableError, match=f"at most {MAX_WIDTH} elements"):
        _fast(x, None, weight, None, None)
    with fastbert.use_backend("auto"):
        out = fastbert.ops.add_layer_norm(x, None, weight, None, 1e-5)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (MAX_WIDTH + 1,), eps=1e-5))


def test_add_layer_norm_registered_ops_pass_opcheck(device):
    from fastbert.kernels.add_layer_norm import _add_layer_norm_fwd_op

    x, residual, weight, bias, x_bias = (t.requires_grad_() for t in _inputs((3, 17), device, torch.float32))
    seed = torch.tensor([7])
    torch.library.opcheck(_add_layer_norm_fwd_op, (x, residual, weight, bias, 1e-12, x_bias, 0.25, seed))


def test_add_layer_norm_traces_without_graph_breaks(device):
    # The kernel entry itself, dropout seed drawing included.
    from fastbert.kernels.add_layer_norm import add_layer_norm_triton

    def step(x, residual, weight, bias, x_bias):
        return add_layer_norm_triton(x, residual, weight, bias, 1e-12, x_bias=x_bias, dropout_p=0.1).sum()

    inputs = [t.requires_grad_() for t in _inputs((4, 40), device, torch.float32)]
    torch.compile(step, backend="aot_eager", fullgraph=True)(*inputs).backward()
    assert all(t.grad is not None for t in inputs)
