"""int8 linear (fastbert/cpu/int8_linear.py): the per-token quantization kernel, the oneDNN int8 GEMM path
against the exact (fp64) integer reference, and the quantization error against the float linear."""
import math

import pytest
import torch

from fastbert import extension
from fastbert.cpu import int8_linear as ops

needs_fast = pytest.mark.skipif(ops.problem() is not None, reason=str(ops.problem()))
ACTIVATIONS = [None, "gelu", "gelu_tanh"]


def problem(tokens=37, fan_in=96, fan_out=160):
    x = torch.randn(tokens, fan_in) * 3.0
    weight = torch.randn(fan_out, fan_in) / math.sqrt(fan_in)
    return x, weight, torch.randn(fan_out)


@pytest.mark.skipif(extension.load_problem() is not None, reason=str(extension.load_problem()))
@pytest.mark.skipif(not ops.vnni_present(), reason="this CPU has no VNNI: the fast int8 path does not run here")
def test_fast_path_runs_here():
    """Fence on torch's private oneDNN int8 ops: this fails loudly when a torch release changes them
    (int8_linear then runs the reference, correct but slow)."""
    assert ops.problem() is None


@pytest.mark.skipif(ops.vnni_present(), reason="this CPU has VNNI")
def test_without_vnni_the_fast_path_says_why():
    """oneDNN's u8 x s8 GEMM without VNNI sums byte pairs in saturating 16 bits: wrong, so refused by name."""
    assert "VNNI" in str(ops.problem())


@needs_fast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_point", [0, 128])
def test_quantize_kernel_matches_reference_bitwise(dtype, zero_point):
    """zero_point 0 stores int8; 128 stores uint8 = int8 + 128 (oneDNN's u8 x s8 form on CPUs without AMX)."""
    module = extension.module()
    x = torch.randn(29, 200).to(dtype)
    x[3] = 0.0  # an all-zero row: scale 1, zeros
    x[5, 7] = 1e4  # an outlier row
    q, scale = torch.empty(29, 200, dtype=torch.uint8 if zero_point else torch.int8), torch.empty(29)
    code = module.FLOAT32 if dtype == torch.float32 else module.BFLOAT16
    module.quantize_rows_int8(x.data_ptr(), q.data_ptr(), scale.data_ptr(), 29, 200, code, zero_point, 2)
    q_ref, scale_ref = ops.quantize_rows_ref(x)
    assert torch.equal(q.int() - zero_point, q_ref.int())
    torch.testing.assert_close(scale, scale_ref, rtol=1e-7, atol=0)
    assert scale[3] == 1.0 and torch.equal(q[3].int(), torch.full((200,), zero_point, dtype=torch.int32))
    with pytest.raises(ValueError, match="zero_point must be 0"):
        module.quantize_rows_int8(x.data_ptr(), q.data_ptr(), scale.data_ptr(), 29, 200, code, 1, 2)


@needs_fast
@pytest.mark.parametrize("zero_point", [0, 128])
def test_both_activation_forms_give_the_same_result(zero_point, monkeypatch):
    """int8 (AMX-INT8 CPUs) and uint8 + 128 (the others) are the same integers: either form matches the reference
    where oneDNN runs it (a form this CPU runs slowly still runs, on oneDNN's reference loop: small shapes only)."""
    monkeypatch.setattr(ops, "activation_zero_point", lambda: zero_point)
    x, weight, bias = problem(1, 64, 48)
    x = torch.randn(5, 64)
    weight_int8, scale = ops.quantize_weight(weight)
    with torch.no_grad():
        fast = ops.int8_linear(x, weight_int8, scale, bias, "gelu", packed_weight=ops.prepack(weight_int8))
    exact = ops.int8_linear_ref(x.double(), weight_int8, scale, bias, "gelu")
    assert (fast.double() - exact).abs().max().item() <= 1e-5 * (1 + exact.abs().max().item())


def test_activation_form_follows_the_cpu(pretend_machine):
    """uint8 + 128 unless the CPU has AMX-INT8 and its tiles: oneDNN runs s8 x s8 on VNNI only in its reference
    loop."""
    refused = {"amx_bf16_gemm": False, "avx512_bf16_gemm": True, "avx512_fp32_gemm": True}  # a VM without tiles
    for features, kernels, expected in ((["avx512_vnni", "amx_int8"], None, 0), (["avx512_vnni"], None, 128),
                                        ([], None, 128), (["avx512_vnni", "amx_int8"], refused, 128)):
        pretend_machine(features, kernels)
        assert ops.activation_zero_point() == expected


@needs_fast
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 8, 8), (37, 96, 160), (2, 5, 64, 96)])
def test_fast_path_matches_integer_reference(activation, with_bias, shape):
    *leading, fan_in, fan_out = shape
    x, weight, bias = problem(1, fan_in, fan_out)
    x = torch.randn(*leading, fan_in) * 3.0
    bias = bias if with_bias else None
    weight_int8, scale = ops.quantize_weight(weight)
    with torch.no_grad():
        fast = ops.int8_linear(x, weight_int8, scale, bias, activation, packed_weight=ops.prepack(weight_int8))
        exact = ops.int8_linear_ref(x.double(), weight_int8, scale, bias, activation)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    # the same integer products; only fp32 rounding of the scales and the sum order differ
    assert (fast.double() - exact).abs().max().item() <= 1e-5 * (1 + exact.abs().max().item())


@needs_fast
def test_bf16_inputs_give_bf16_outputs_within_rounding():
    x, weight, bias = problem()
    weight_int8, scale = ops.quantize_weight(weight)
    xb = x.bfloat16()
    with torch.no_grad():
        fast = ops.int8_linear(xb, weight_int8, scale, bias, "gelu", packed_weight=ops.prepack(weight_int8))
        exact = ops.int8_linear_ref(xb.double(), weight_int8, scale, bias, "gelu")
    assert fast.dtype == torch.bfloat16
    assert (fast.double() - exact).abs().max().item() <= 2**-8 * exact.abs().max().item() + 1e-2


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_quantization_error_against_the_float_linear(activation):
    x, weight, bias = problem(tokens=64, fan_in=384, fan_out=256)
    weight_int8, scale = ops.quantize_weight(weight)
    got = ops.int8_linear_ref(x.double(), weight_int8, scale, bias, activation)
    exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    if activation is not None:
        exact = torch.nn.functional.gelu(exact, approximate="none" if activation == "gelu" else "tanh")
    relative = ((got - exact).norm() / exact.norm()).item()
    assert 1e-4 < relative < 2e-2  # int8 rounding of both operands: visible, and small


def test_without_a_packed_weight_or_with_the_fast_path_off_it_runs_the_reference(monkeypatch):
    x, weight, bias = problem()
    weight_int8, scale = ops.quantize_weight(weight)
    expected = ops.int8_linear_ref(x, weight_int8, scale, bias)
    torch.testing.assert_close(ops.int8_linear(x, weight_int8, scale, bias), expected)
    monkeypatch.setattr(ops, "problem", lambda: "switched off for this test")
    torch.testing.assert_close(ops.int8_linear(x, weight_int8, scale, bias, packed_weight=torch.empty(0)), expected)


def test_bad_activation_raises():
    x, weight, bias = problem()
    weight_int8, scale = ops.quantize_weight(weight)
    with pytest.raises(ValueError, match="activation"):
        ops.int8_linear(x, weight_int8, scale, bias, "relu")


@needs_fast
def test_int8_gemm_is_not_onednns_reference_loop():
    """oneDNN picks its int8 GEMM per CPU and input form; its fallback (ref_int8) is correct but ~1000x slower
    (s8 x s8 on a VNNI CPU took 970 ms for 128 x 384 x 1536). ONEDNN_VERBOSE names the implementation it ran."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from fastbert.cpu import int8_linear as ops\n"
        "w, s = ops.quantize_weight(torch.randn(64, 96))\n"
        "with torch.no_grad():\n"
        "    ops.int8_linear(torch.randn(8, 96), w, s, torch.zeros(64), packed_weight=ops.prepack(w))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ONEDNN_VERBOSE": "1"})
    assert done.returncode == 0, done.stderr
    matmuls = [line for line in done.stdout.splitlines() if ",exec," in line and ",matmul," in line]
    assert matmuls, f"no oneDNN matmul line in ONEDNN_VERBOSE output:\n{done.stdout[-2000:]}"
    assert not any(",ref" in line for line in matmuls), matmuls
