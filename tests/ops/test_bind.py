"""Binding (fastbert.ops._dispatch.bind, registry.Implementation.binder): the registry's choice for fixed
parameters, prepared once, gives what the per-call op gives; inference plans bind every step this way."""
import pytest
import torch

import fastbert
from fastbert import backend, extension
from fastbert.ops import _dispatch, add_layer_norm_ref, bias_gelu_ref, linear_ref, qkv_attention
from fastbert.ops.attention import varlen_attention_ref

BACKENDS = ["torch", "auto"] + (["cpp"] if extension.load_problem() is None else [])


def probe(dtype=torch.float32):
    return torch.empty(0, dtype=dtype)


@pytest.mark.parametrize("selection", BACKENDS)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_bound_linear_gives_the_reference(selection, activation):
    x, weight, bias = torch.randn(5, 32), torch.randn(48, 32), torch.randn(48)
    with fastbert.use_backend(selection), torch.inference_mode():
        run = _dispatch.bind("linear", probe(), weight=weight, bias=bias, activation=activation)
        got = run(x)
    expected = linear_ref(x.double(), weight.double(), bias.double(), activation)
    assert (got.double() - expected).abs().max() < 1e-4


@pytest.mark.parametrize("selection", BACKENDS)
def test_bound_norm_and_gelu_give_the_reference(selection):
    width = 64
    x, residual = torch.randn(6, width), torch.randn(6, width)
    weight, bias, x_bias = torch.randn(width), torch.randn(width), torch.randn(width)
    with fastbert.use_backend(selection), torch.inference_mode():
        norm = _dispatch.bind("add_layer_norm", probe(), width=width, weight=weight, bias=bias, eps=1e-5, x_bias=x_bias)
        gelu = _dispatch.bind("bias_gelu", probe(), bias=bias, approximate="tanh")
        got_norm, got_gelu = norm(x, residual), gelu(x)
    as64 = [t.double() for t in (x, residual, weight, bias, x_bias)]
    expected_norm = add_layer_norm_ref(as64[0], as64[1], as64[2], as64[3], 1e-5, x_bias=as64[4])
    assert (got_norm.double() - expected_norm).abs().max() < 1e-5
    assert (got_gelu.double() - bias_gelu_ref(as64[0], as64[3], "tanh")).abs().max() < 1e-5


def test_cpp_binders_skip_the_per_call_op(monkeypatch):
    """Under "cpp" the norm binds fastbert._C's kernel with its addresses read once: the per-call op never runs."""
    if extension.load_problem() is not None:
        pytest.skip(f"fastbert._C: {extension.load_problem()}")
    from fastbert.ops.extension import add_layer_norm as kernels

    monkeypatch.setattr(kernels, "add_layer_norm_extension", lambda *a, **k: pytest.fail("per-call op ran"))
    with fastbert.use_backend("cpp"):
        norm = _dispatch.bind("add_layer_norm", probe(), width=8, weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5)
    assert hasattr(norm, "parameters")  # the held, converted parameters of bind_cpu
    assert norm(torch.randn(3, 8), torch.randn(3, 8)).shape == (3, 8)


@pytest.mark.parametrize("selection", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_qkv_attention_gives_the_reference(selection, dtype):
    heads, head_dim = 2, 16
    lengths = [9, 1, 40]
    cu = torch.tensor([0, 9, 10, 50], dtype=torch.int32)
    qkv = torch.randn(50, 3 * heads * head_dim).to(dtype)
    with fastbert.use_backend(selection), torch.inference_mode():
        bound = _dispatch.bind("qkv_attention", probe(dtype), head_dim=head_dim, like=probe(dtype), head_size=head_dim)
        packed = bound.packed(qkv, heads, head_dim, 0.3, cu, max(lengths))
        dense = bound.dense(qkv[:40], heads, head_dim, 0.3, 2, 20)
    q, k, v = (t.double() for t in qkv_attention.split(qkv, heads, head_dim))
    expected = varlen_attention_ref(q, k, v, cu, max(lengths), softmax_scale=0.3).reshape(50, -1)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (packed.double() - expected).abs().max() < tolerance
    cu_dense = torch.tensor([0, 20, 40], dtype=torch.int32)
    expected = varlen_attention_ref(q[:40], k[:40], v[:40], cu_dense, 20, softmax_scale=0.3).reshape(40, -1)
    assert (dense.double() - expected).abs().max() < tolerance


def test_qkv_attention_is_inference_only():
    call = backend.signature("qkv_attention", probe(), head_dim=16, grad=True)
    for name in ("torch", "cpp"):
        assert "inference-only" in backend.REGISTRY.get("qkv_attention", name).problem(call)


def test_an_op_without_binders_is_refused():
    with pytest.raises(ValueError, match="no binder"):
        _dispatch.bind("window_attention", probe())
