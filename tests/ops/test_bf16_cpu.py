"""bf16 on CPU: the packed oneDNN GEMM in bf16 (bf16 weights, or fp32 weights under autocast) and the
residual LayerNorm on a bf16 GEMM output, against float64 with bf16 tolerances.

Tolerance: the fastbert result may be at most 2x torch's own bf16 error plus BF16_ATOL (helpers'
rule); bf16 keeps 8 significant bits, so outputs of size ~5 carry rounding steps of ~2e-2.
"""
import importlib
import math
import os

import pytest
import torch

from fastbert.cpu import onednn_linear
from fastbert.ops import add_layer_norm
from tests.helpers import assert_close_to_ref, max_error

linear_op = importlib.import_module("fastbert.ops.linear")
needs_onednn = pytest.mark.skipif(onednn_linear.mkldnn_problem() is not None,
                                  reason=str(onednn_linear.mkldnn_problem()))
_BF16_PROBLEM = onednn_linear.mkldnn_problem() or onednn_linear.bf16_problem()
needs_onednn_bf16 = pytest.mark.skipif(_BF16_PROBLEM is not None, reason=str(_BF16_PROBLEM))
BF16_ATOL = 5e-2
ACTIVATIONS = [None, "gelu", "gelu_tanh"]


def problem(tokens=37, fan_in=96, fan_out=160):
    x = torch.randn(tokens, fan_in)
    weight = torch.randn(fan_out, fan_in) / math.sqrt(fan_in)
    return x, weight, torch.randn(fan_out)


def reference64(x, weight, bias, activation):
    """The float64 result on the bf16-rounded inputs (what the bf16 GEMM is asked to compute)."""
    x, weight = x.bfloat16().double(), weight.bfloat16().double()
    return linear_op.linear_ref(x, weight, bias.double(), activation)


@needs_onednn_bf16
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bf16_weights_run_the_packed_gemm(activation):
    x, weight, bias = problem()
    xb, wb = x.bfloat16(), weight.bfloat16()
    with torch.no_grad():
        fast = onednn_linear.linear_onednn(xb, wb, bias.bfloat16(), activation)
        same_dtype = linear_op.linear_ref(xb, wb, bias.bfloat16(), activation)
    assert fast.dtype == torch.bfloat16
    assert_close_to_ref(fast, same_dtype, reference64(x, weight, bias.bfloat16().float(), activation), atol=BF16_ATOL)
    assert onednn_linear.packed_weight(wb).dtype == torch.bfloat16


@needs_onednn
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autocast_runs_bf16_with_fp32_bias(activation):
    x, weight, bias = problem()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        fast = onednn_linear.linear_onednn(x, weight, bias, activation)
        same_dtype = linear_op.linear_ref(x, weight, bias, activation)  # F.linear under autocast
    assert fast.dtype == same_dtype.dtype == torch.bfloat16
    exact = reference64(x, weight, bias, activation)
    assert_close_to_ref(fast, same_dtype, exact, atol=BF16_ATOL)
    with torch.no_grad():
        fp32 = onednn_linear.linear_onednn(x, weight, bias, activation)
    # it really ran in bf16: its error is of bf16 size, far above fp32's
    assert max_error(fast, exact) > 20 * max_error(fp32, linear_op.linear_ref(x.double(), weight.double(),
                                                                              bias.double(), activation))


@needs_onednn_bf16
def test_autocast_packs_a_separate_bf16_copy_and_keeps_the_fp32_one():
    x, weight, bias = problem()
    with torch.no_grad():
        fp32_packed = onednn_linear.packed_weight(weight)
        with torch.autocast("cpu", torch.bfloat16):
            onednn_linear.linear_onednn(x, weight, bias)
        assert onednn_linear.packed_weight(weight) is fp32_packed
        assert onednn_linear.packed_weight(weight, torch.bfloat16).dtype == torch.bfloat16


@needs_onednn
def test_other_autocast_dtypes_run_the_reference_under_autocast():
    x, weight, bias = problem()
    with torch.no_grad(), torch.autocast("cpu", torch.float16):
        fast = onednn_linear.linear_onednn(x, weight, bias)
        expected = torch.nn.functional.linear(x, weight, bias)
    assert fast.dtype == expected.dtype
    torch.testing.assert_close(fast, expected)


@needs_onednn
def test_mismatched_dtypes_without_autocast_run_the_reference():
    x, weight, bias = problem()
    assert onednn_linear.compute_dtype(x, weight.bfloat16()) is None
    with torch.no_grad(), pytest.raises(RuntimeError):  # torch's own dtype error, not a wrong answer
        onednn_linear.linear_onednn(x, weight.bfloat16(), bias)


def test_add_layer_norm_promotes_a_bf16_input_onto_an_fp32_residual():
    x, residual = torch.randn(11, 64).bfloat16(), torch.randn(11, 64)
    weight, bias, x_bias = torch.randn(64), torch.randn(64), torch.randn(64)
    with torch.no_grad():
        got = add_layer_norm(x, residual, weight, bias, 1e-12, x_bias=x_bias)
    h = x.double() + x_bias.double() + residual.double()
    expected = torch.nn.functional.layer_norm(h, (64,), weight.double(), bias.double(), 1e-12)
    assert got.dtype == torch.float32
    assert max_error(got, expected) <= 1e-4


@needs_onednn_bf16
def test_the_registry_sends_bf16_inference_to_the_packed_gemm():
    """A bf16 model's GEMMs run the packed oneDNN path, not F.linear (the registry once claimed fp32 only,
    so bf16 models silently ran unpacked bf16 GEMMs at about twice the time)."""
    x, weight, bias = problem()
    xb, wb, bb = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    with torch.no_grad():
        assert linear_op.linear_implementation(xb, wb, bb) is onednn_linear.linear_onednn
        assert linear_op.fuses_epilogue(xb, wb, bb)
    wb.requires_grad_(True)
    assert linear_op.linear_implementation(xb, wb, bb) is linear_op.linear_ref  # autograd records: reference


@needs_onednn
def test_bf16_probe_is_torchs_own():
    """Fence on the private probe behind onednn_linear.bf16_problem: were it gone, bf16 would quietly leave
    oneDNN on every CPU; here it must exist and agree with the CPU (AVX512-BW/VL/DQ or AVX-NE-CONVERT)."""
    assert hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    native = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert (onednn_linear.bf16_problem() is None) == native
