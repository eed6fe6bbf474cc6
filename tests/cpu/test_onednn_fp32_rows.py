"""The machine record's fp32 row limit for oneDNN's packed GEMM (`onednn_fp32_max_rows`) and its GELU placement
(`gelu_epilogue`): on a CPU without AVX-512, calls of more rows run on F.linear and GELU runs after the GEMM;
elsewhere oneDNN runs every row count. Both paths (the per-call op and the plans' binding) follow the same rule,
so they stay bitwise equal, and every result matches the fp64 reference."""
from __future__ import annotations

import pytest
import torch

from fastbert.cpu import machine, onednn_linear
from fastbert.models import plan_steps

pytestmark = pytest.mark.skipif(onednn_linear.mkldnn_problem() is not None,
                                reason=f"no packed oneDNN GEMM: {onednn_linear.mkldnn_problem()}")

NO_KERNELS = {"amx_bf16_gemm": False, "avx512_bf16_gemm": False, "avx512_fp32_gemm": False}  # runs anywhere
LIMIT = machine.AVX2_ONEDNN_FP32_MAX_ROWS
ROWS = (1, 16, LIMIT, LIMIT + 1, 3 * LIMIT + 5)
TOLERANCE = 1e-4  # fp32 GEMM of K=96 against the fp64 reference


@pytest.fixture
def torch_calls(monkeypatch):
    """The row counts of the calls that went to F.linear instead of oneDNN."""
    calls, reference = [], onednn_linear._reference

    def spy(x, *args, **kwargs):
        calls.append(x.numel() // x.shape[-1])
        return reference(x, *args, **kwargs)

    monkeypatch.setattr(onednn_linear, "_reference", spy)
    return calls


def _problem(rows: int):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator)
    weight, bias = torch.randn(80, 96, generator=generator) / 10, torch.randn(80, generator=generator)
    return x, weight, bias


def _expected(x, weight, bias, activation):
    y = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    return y if activation is None else torch.nn.functional.gelu(y)


@pytest.mark.parametrize("features, limit", [(["avx2"], LIMIT), (["avx2", "avx512f"], float("inf"))])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_rows_above_the_limit_run_on_f_linear(pretend_machine, torch_calls, features, limit, activation):
    pretend_machine(features, NO_KERNELS)
    for rows in ROWS:
        x, weight, bias = _problem(rows)
        with torch.inference_mode():
            bound = onednn_linear.bind(None, weight, bias, activation)(x)
            per_call = onednn_linear.linear_onednn(x, weight, bias, activation)
        assert torch.equal(bound, per_call), rows  # one rule, one kernel per row count
        assert (bound.double() - _expected(x, weight, bias, activation)).abs().max() < TOLERANCE, rows
    assert torch_calls == [rows for rows in ROWS if rows > limit for _ in range(2)]


@pytest.mark.parametrize("features, in_epilogue", [(["avx2"], False), (["avx2", "avx512f"], True)])
def test_the_plans_ffn_gelu_goes_where_the_record_says(pretend_machine, monkeypatch, features, in_epilogue):
    """Without AVX-512 the FFN-in GELU is fastbert's bias_gelu after the GEMM (oneDNN's post-op cost 1.17-1.31x
    there from 64 rows on); with it, oneDNN's epilogue. The bound result matches the fp64 reference either way."""
    pretend_machine(features, NO_KERNELS)
    bound, bind = [], plan_steps._dispatch.bind

    def spy(op, probe, **kwargs):
        bound.append((op, kwargs.get("activation")))
        return bind(op, probe, **kwargs)

    monkeypatch.setattr(plan_steps._dispatch, "bind", spy)
    x, weight, bias = _problem(2 * LIMIT)
    linear = torch.nn.Linear(96, 80)
    with torch.no_grad():
        linear.weight.copy_(weight), linear.bias.copy_(bias)
    with torch.inference_mode():
        got = plan_steps.Resolver(torch.device("cpu"), torch.float32).gemm_gelu(linear, "none")(x)
    assert bound == ([("linear", "gelu")] if in_epilogue else [("linear", None), ("bias_gelu", None)])
    assert (got.double() - _expected(x, weight, bias, "gelu")).abs().max() < TOLERANCE
