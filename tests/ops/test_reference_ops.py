"""The "torch" backend of every op against float64 references, forward and every gradient."""
import functools

import pytest
import torch

import fastbert
from fastbert import ops
from tests.helpers import assert_close_to_ref, gelu_formula, layer_norm_formula, packed_attention_formula

DTYPES = [torch.float32, torch.bfloat16]


def leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


def run_with_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad_out.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_reference_matches_the_formula(approximate):
    x, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(ops.bias_gelu_ref(x, b, approximate), gelu_formula(x + b, approximate))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 384), (17, 1000)])
def test_bias_gelu_forward_and_gradients(dtype, approximate, shape):
    x64, b64 = torch.randn(shape, dtype=torch.float64) * 3, torch.randn(shape[-1], dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    with fastbert.use_backend("torch"):
        inputs = [leaf(x64, dtype), leaf(b64, dtype)]
        out, grads = run_with_grads(lambda x, b: ops.bias_gelu(x, b, approximate), inputs, grad)
    def formula(x, b):
        return gelu_formula(x + b, approximate)

    ref, ref_grads = run_with_grads(formula, [leaf(x64, torch.float64), leaf(b64, torch.float64)], grad)
    plain, plain_grads = run_with_grads(formula, [leaf(x64, dtype), leaf(b64, dtype)], grad)
    assert_close_to_ref(out, plain, ref, name="out")
    for g, p, r in zip(grads, plain_grads, ref_grads):
        assert_close_to_ref(g, p, r, name="grad")


# No width 1: a one-element LayerNorm outputs its bias, and its gradients are rounding noise times rstd.
WIDTH_EPS = [(33, 1e-5), (7, 1e-12), (7, 1e-5), (384, 1e-12), (768, 1e-12), (1000, 1e-5), (1000, 1e-12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,eps", WIDTH_EPS)
def test_add_layer_norm_forward_and_gradients(dtype, width, eps):
    rows = 6
    tensors64 = [torch.randn(rows, width, dtype=torch.float64), torch.randn(rows, width, dtype=torch.float64)]
    tensors64 += [torch.randn(width, dtype=torch.float64) for _ in range(3)]  # weight, bias, x_bias
    grad = torch.randn(rows, width, dtype=torch.float64)

    def fused(x, residual, weight, bias, x_bias):
        return ops.add_layer_norm(x, residual, weight, bias, eps, x_bias=x_bias)

    with fastbert.use_backend("torch"):
        out, grads = run_with_grads(fused, [leaf(t, dtype) for t in tensors64], grad)
    def formula(x, residual, weight, bias, x_bias):
        return layer_norm_formula(x, residual, weight, bias, eps, x_bias)

    ref, ref_grads = run_with_grads(formula, [leaf(t, torch.float64) for t in tensors64], grad)
    plain, plain_grads = run_with_grads(formula, [leaf(t, dtype) for t in tensors64], grad)
    assert_close_to_ref(out, plain, ref, name="out")
    for name, g, p, r in zip(["x", "residual", "weight", "bias", "x_bias"], grads, plain_grads, ref_grads):
        assert_close_to_ref(g, p, r, name=name)


LAYER_NORM_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(fastbert.backend.backend_problem(name) is not None,
                                                reason=f"{name}: {fastbert.backend.backend_problem(name)}"))
    for name in ("torch", "cpp")
]


@pytest.mark.parametrize("backend", LAYER_NORM_BACKENDS)
def test_add_layer_norm_statistics_are_fp32_for_bf16(backend):
    # A large common offset with real spread that bf16 keeps (ulp 0.5 at 100, std 2): a mean rounded to
    # bf16 is off by up to 0.25, i.e. up to 0.125 in the normalized output.
    x = (torch.randn(32, 768) * 2 + 100).to(torch.bfloat16)
    assert x.double().std(-1).min() > 1.5, "the input lost its spread in bf16"
    weight, bias = torch.randn(768), torch.randn(768)
    with fastbert.use_backend(backend):
        out = ops.add_layer_norm(x, None, weight.bfloat16(), bias.bfloat16(), 1e-12)
    ref = layer_norm_formula(x.double(), 0, weight.bfloat16().double(), bias.bfloat16().double(), 1e-12, 0)
    # Rounding the output to bf16 moves it by at most half an ulp, <= |ref| * 2**-8 (measured: up to 0.8 of
    # that bound over 5 seeds, for both backends); 1.5x that bound leaves room for the fp32 math.
    worst_rounding = (ref.abs() * 2.0**-8).max().item()
    error = (out.double() - ref).abs().max().item()
    assert error <= 1.5 * worst_rounding, f"{backend}: error {error:.3g} > 1.5 * bf16 rounding {worst_rounding:.3g}"


def dropout_mask_of(backend, seed, shape, p):
    """The keep mask that add_layer_norm draws for `shape` after torch.manual_seed(seed): on a probe of
    ones and no residual, kept elements normalize above the row mean and dropped ones below."""
    torch.manual_seed(seed)
    with fastbert.use_backend(backend):
        probe = ops.add_layer_norm(torch.ones(shape), None, torch.ones(shape[-1]), None, 1e-5, dropout_p=p)
    return probe > 0


@pytest.mark.parametrize("backend", LAYER_NORM_BACKENDS)
def test_add_layer_norm_dropout_scales_kept_values(backend):
    p, shape, eps = 0.5, (64, 256), 1e-5
    tensors = [torch.randn(*shape), torch.randn(*shape), torch.randn(256), torch.randn(256)]  # x, residual, w, b
    keep = dropout_mask_of(backend, 1234, shape, p)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.02, "the probe did not find a dropout mask"
    torch.manual_seed(1234)  # the same mask again, now with a residual: LayerNorm sees the 1/(1-p) scale
    with fastbert.use_backend(backend):
        out = ops.add_layer_norm(*tensors, eps, dropout_p=p)

    def formula(x, residual, weight, bias):
        return layer_norm_formula(x * keep / (1 - p), residual, weight, bias, eps, 0)

    assert_close_to_ref(out, formula(*tensors), formula(*(t.double() for t in tensors)), name="dropout")


def attention_inputs(batch, heads, seqlen, head_dim, dtype):
    return [torch.randn(batch, heads, seqlen, head_dim, dtype=torch.float64) for _ in range(3)]


def attention_formula(q, k, v, keep, scale):
    """Independent attention: per batch row, only the kept keys."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        cols = keep[b].nonzero().flatten()
        if cols.numel():
            scores = q[b] @ k[b][:, cols].transpose(-1, -2) * scale
            out[b] = torch.softmax(scores, -1) @ v[b][:, cols]
    return out


MASKS = {
    "none": None,
    "right": torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]]),
    "left": torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1]]),
    "holes_and_empty": torch.tensor([[1, 0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0, 1]]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("implementation", ["sdpa_backend", "reference"])
def test_attention_forward_and_gradients(dtype, mask_name, head_dim, implementation):
    mask = MASKS[mask_name]
    keep = mask.bool() if mask is not None else torch.ones(3, 7, dtype=torch.bool)
    q64, k64, v64 = attention_inputs(3, 2, 7, head_dim, dtype)
    grad = torch.randn_like(q64)
    scale = 0.3
    fn = ops.attention if implementation == "sdpa_backend" else ops.attention_ref
    with fastbert.use_backend("torch"):
        inputs = [leaf(t, dtype) for t in (q64, k64, v64)]
        out, grads = run_with_grads(functools.partial(fn, attention_mask=mask, softmax_scale=scale), inputs, grad)

    def formula(q, k, v):
        return attention_formula(q, k, v, keep, scale)

    ref, ref_grads = run_with_grads(formula, [leaf(t, torch.float64) for t in (q64, k64, v64)], grad)
    plain, plain_grads = run_with_grads(formula, [leaf(t, dtype) for t in (q64, k64, v64)], grad)
    assert_close_to_ref(out, plain, ref, name="out")
    for name, g, p, r in zip("qkv", grads, plain_grads, ref_grads):
        assert_close_to_ref(g, p, r, name=f"d{name}")


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    q, k, v = (torch.randn(2, 3, 5, 16, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    for fn in (ops.attention, ops.attention_ref):
        out = fn(q, k, v, mask)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all() and torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
            t.grad = None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation", ["sdpa_backend", "reference"])
def test_varlen_attention_matches_padded_attention(dtype, implementation):
    lengths = [5, 1, 0, 7]
    seqlen, heads, head_dim = 7, 2, 32
    mask = (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()
    q64, k64, v64 = attention_inputs(4, heads, seqlen, head_dim, dtype)
    padded_ref = attention_formula(q64, k64, v64, mask.bool(), head_dim**-0.5)

    def pack(t):  # (batch, heads, seq, dim) -> (tokens, heads, dim)
        return ops.unpad_input(t.transpose(1, 2), mask)[0]

    _, indices, cu_seqlens, max_seqlen = ops.unpad_input(q64.transpose(1, 2), mask)
    grad = torch.randn(cu_seqlens[-1].item(), heads, head_dim, dtype=torch.float64)
    fn = ops.varlen_attention if implementation == "sdpa_backend" else ops.varlen_attention_ref
    with fastbert.use_backend("torch"):
        out, grads = run_with_grads(lambda q, k, v: fn(q, k, v, cu_seqlens, max_seqlen),
                                    [leaf(pack(t), dtype) for t in (q64, k64, v64)], grad)

    def formula(q, k, v):
        return packed_attention_formula(q, k, v, cu_seqlens, head_dim**-0.5)

    ref, ref_grads = run_with_grads(formula, [leaf(pack(t), torch.float64) for t in (q64, k64, v64)], grad)
    plain, plain_grads = run_with_grads(formula, [leaf(pack(t), dtype) for t in (q64, k64, v64)], grad)
    torch.testing.assert_close(ref, pack(padded_ref))  # the packed formula is the padded one on real tokens
    assert_close_to_ref(out, plain, ref, name="out")
    for name, g, p, r in zip("qkv", grads, plain_grads, ref_grads):
        assert_close_to_ref(g, p, r, name=f"d{name}")


def test_unpad_pad_round_trip_and_layout():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    packed, indices, cu_seqlens, max_seqlen = ops.unpad_input(hidden, mask)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 5]
    assert max_seqlen == 3 and indices.tolist() == [0, 1, 6, 8, 9]
    torch.testing.assert_close(packed, hidden.reshape(15, 4)[indices])
    torch.testing.assert_close(ops.pad_input(packed, indices, 3, 5), hidden * mask[..., None])


def test_bad_arguments_name_the_argument_and_the_limit():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
        ops.bias_gelu(x, torch.randn(7))
    with pytest.raises(ValueError, match="approximate must be one of"):
        ops.bias_gelu(x, None, approximate="fast")
    with pytest.raises(ValueError, match="dropout_p must be in \\[0, 1\\), got 1.5"):
        ops.add_layer_norm(x, None, torch.ones(8), None, 1e-5, dropout_p=1.5)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        q = torch.randn(4, 2, 8)
        ops.varlen_attention(q, q, q, torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="attention_mask must have shape \\(batch, seq\\) = \\(1, 3\\)"):
        q = torch.randn(1, 2, 3, 8)
        ops.attention(q, q, q, torch.ones(1, 4))
