"""int8_linear as a registry op (fastbert/ops/int8_linear.py): the one chooser for Int8Linear's calls and for the int8
GEMMs an inference plan binds. The arithmetic of both implementations: tests/cpu/test_int8_linear.py."""
from __future__ import annotations

import pytest
import torch

from fastbert import backend
from fastbert.cpu import int8_linear as cpu_int8
from fastbert.ops import _dispatch
from fastbert.ops.int8_linear import int8_linear
from fastbert.registry import Signature


def _weights(generator, out_features=12, in_features=16):
    weight, scale = cpu_int8.quantize_weight(torch.randn(out_features, in_features, generator=generator))
    return weight, scale, torch.randn(out_features, generator=generator)


def test_int8_linear_is_registered_with_its_limits():
    onednn = backend.REGISTRY.get("int8_linear", "onednn")
    assert backend.REGISTRY.get("int8_linear", "torch") is not None
    assert onednn.devices == {"cpu"} and set(onednn.dtypes) == {torch.float32, torch.bfloat16}
    assert backend.REGISTRY.auto_order("int8_linear", "cpu")[0] == "onednn"


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_the_op_runs_what_the_registry_resolves(activation):
    generator = torch.Generator().manual_seed(3)
    weight, scale, bias = _weights(generator)
    x = torch.randn(5, 16, generator=generator)
    with torch.no_grad():
        got = int8_linear(x, weight, scale, bias, activation)
        bound = _dispatch.bind("int8_linear", x.new_empty(0), weight_int8=weight, weight_scale=scale, bias=bias,
                               activation=activation)(x)
    chosen = backend.resolved_backend("int8_linear", x, grad=False)
    expected = cpu_int8.int8_linear_ref(x, weight, scale, bias, activation)
    if chosen == "torch":  # the reference itself
        assert torch.equal(got, expected) and torch.equal(bound, expected)
    else:  # oneDNN's int8 GEMM: the same integer products, fp32 scales
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(bound, got)


def test_the_onednn_entry_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(cpu_int8, "problem", lambda: "no int8 dot product here")
    backend.REGISTRY.clear_cache()
    try:
        assert backend.resolved_backend("int8_linear", torch.empty(0), grad=False) == "torch"
        signature = Signature("int8_linear", "cpu", torch.float32)
        assert "no int8 dot product here" in backend.REGISTRY.get("int8_linear", "onednn").problem(signature)
    finally:
        backend.REGISTRY.clear_cache()


def test_a_bad_activation_is_named():
    generator = torch.Generator().manual_seed(4)
    weight, scale, bias = _weights(generator)
    with pytest.raises(ValueError, match="'relu'"):
        int8_linear(torch.randn(2, 16), weight, scale, bias, "relu")


def test_the_plan_binds_int8_gemms_through_the_registry(monkeypatch):
    from fastbert.models import plan
    from fastbert.quantize import quantize
    from tests.models.test_plan import model_and_batch

    bound = []
    original = _dispatch.bind
    monkeypatch.setattr(_dispatch, "bind", lambda op, *a, **k: bound.append(op) or original(op, *a, **k))
    model, batch = model_and_batch()
    quantize(model, calibration=[batch], min_cosine_mean=0.0, min_cosine=0.0)
    bound.clear()  # the calibration forwards built plans too
    plan.forget_plans(model)
    with torch.no_grad():
        model(**batch)
    layers = model.config.num_hidden_layers
    assert bound.count("int8_linear") == 4 * layers  # QKV (fused), attention output, FFN in and out
