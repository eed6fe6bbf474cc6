"""The AMX bf16 GEMM for few rows (fastbert/ops/amx_linear.py, csrc/cpu/amx_linear.cpp) against a float64
reference, on fresh random inputs: every activation, tails of rows and column groups, 1-3 threads; and
where it runs (the plan and oneDNN's packed linear send at most MAX_ROWS rows to it)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastbert.ops import amx_linear, onednn_linear

_PROBLEM = amx_linear.problem(torch.empty(16, 32))
needs_amx = pytest.mark.skipif(_PROBLEM is not None, reason=f"AMX GEMM unavailable: {_PROBLEM}")


def _float64_reference(x, weight, bias, activation):
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    if activation == "tanh":
        return torch.tanh(y)
    if activation is None:
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def _problem(rows, in_features, out_features, with_bias=True):
    x = torch.randn(rows, in_features).bfloat16()
    weight = (torch.randn(out_features, in_features) / math.sqrt(in_features)).bfloat16()
    bias = torch.randn(out_features) if with_bias else None
    return x, weight, bias


@needs_amx
@pytest.mark.parametrize("activation", amx_linear.ACTIVATIONS)
@pytest.mark.parametrize("rows,in_features,out_features", [
    (1, 32, 16), (5, 64, 48), (16, 384, 384), (17, 96, 80), (40, 384, 1152), (33, 1536, 384),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_reference(activation, rows, in_features, out_features, threads):
    x, weight, bias = _problem(rows, in_features, out_features)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = amx_linear.amx_linear(x, amx_linear.packed_weight(weight), bias, activation, out_features)
    finally:
        torch.set_num_threads(previous)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    reference = _float64_reference(x, weight, bias, activation)
    # fp32 accumulation of exact bf16 products, one bf16 rounding (2^-8 relative) at the end
    torch.testing.assert_close(got.double(), reference, rtol=2 ** -7, atol=1e-4 * math.sqrt(in_features))
    torch.testing.assert_close(got, amx_linear.amx_linear_ref(x, weight, bias, activation), rtol=2 ** -7, atol=1e-3)


@needs_amx
def test_without_bias_and_with_leading_dimensions():
    x, weight, _ = _problem(2 * 7, 64, 32, with_bias=False)
    got = amx_linear.amx_linear(x.view(2, 7, 64), amx_linear.packed_weight(weight), None, None, 32)
    assert got.shape == (2, 7, 32)
    torch.testing.assert_close(got.view(14, 32).double(), _float64_reference(x, weight, None, None),
                               rtol=2 ** -7, atol=1e-3)


@needs_amx
def test_by_rows_sends_many_rows_to_the_large_gemm():
    x, weight, bias = _problem(amx_linear.MAX_ROWS + 1, 64, 32)
    calls = []
    run = amx_linear.by_rows(weight, bias, None, lambda rows: calls.append(rows.shape[0]) or rows[:, :32])
    run(x[: amx_linear.MAX_ROWS])
    assert calls == []
    run(x)
    assert calls == [amx_linear.MAX_ROWS + 1]


def test_shapes_it_cannot_run_say_why():
    assert "out_features % 16" in amx_linear.problem(torch.empty(40, 32))
    assert "in_features % 32" in amx_linear.problem(torch.empty(16, 48))
    large = object()
    assert amx_linear.by_rows(torch.empty(40, 32), None, None, large) is large


@needs_amx
def test_bad_arguments_name_the_argument():
    x, weight, bias = _problem(4, 64, 32)
    packed = amx_linear.packed_weight(weight)
    with pytest.raises(ValueError, match="x must be a bf16"):
        amx_linear.amx_linear(x.float(), packed, bias, None, 32)
    with pytest.raises(ValueError, match="packed weight holds"):
        amx_linear.amx_linear(x, packed, bias, None, 48)
    with pytest.raises(ValueError, match="bias must be fp32"):
        amx_linear.amx_linear(x, packed, bias.bfloat16(), None, 32)
    with pytest.raises(ValueError, match="activation must be one of"):
        amx_linear.amx_linear(x, packed, bias, "relu", 32)


@needs_amx
def test_packed_copy_follows_in_place_changes():
    x, weight, bias = _problem(4, 64, 32)
    first = amx_linear.packed_weight(weight)
    assert amx_linear.packed_weight(weight) is first
    weight.mul_(2)
    again = amx_linear.packed_weight(weight)
    assert again is not first
    torch.testing.assert_close(amx_linear.amx_linear(x, again, bias, None, 32).double(),
                               _float64_reference(x, weight, bias, None), rtol=2 ** -7, atol=1e-3)


@needs_amx
def test_packing_switch_turns_it_off():
    weight = torch.empty(16, 32)
    try:
        onednn_linear.set_packing(False)
        assert "switched off" in amx_linear.problem(weight)
        assert amx_linear.cache_bytes() == 0
    finally:
        onednn_linear.set_packing(True)
    assert amx_linear.problem(weight) is None


@needs_amx
def test_onednn_linear_runs_few_bf16_rows_on_amx():
    x, weight, bias = _problem(16, 64, 32)
    amx_linear.clear_cache()
    with torch.no_grad():
        got = onednn_linear.linear_onednn(x, weight, bias, "gelu")
    assert amx_linear.cache_bytes() == 64 * 32 * 2
    torch.testing.assert_close(got.double(), _float64_reference(x, weight, bias, "gelu"), rtol=2 ** -7, atol=1e-3)


@needs_amx
def test_bf16_plan_runs_short_requests_on_amx_and_matches_hf(monkeypatch):
    import transformers

    import fastbert

    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128)
    hf = transformers.BertModel(config).eval()
    model = fastbert.BertModel(config).eval()
    model.load_state_dict(hf.state_dict())
    model, hf = model.to(torch.bfloat16), hf.double()
    ids = torch.randint(0, 64, (1, 16))
    calls = []
    original = amx_linear.amx_linear
    monkeypatch.setattr(amx_linear, "amx_linear", lambda *a: calls.append(a[-1]) or original(*a))
    with torch.inference_mode():
        got = model(input_ids=ids)
        expected = hf(input_ids=ids)
    assert calls == [3 * 64, 64, 128, 64] * 2 + [64]  # out_features: QKV, output, FFN in and out; the pooler
    torch.testing.assert_close(got.last_hidden_state.double(), expected.last_hidden_state, rtol=0.05, atol=0.05)
    torch.testing.assert_close(got.pooler_output.double(), expected.pooler_output, rtol=0.05, atol=0.02)
