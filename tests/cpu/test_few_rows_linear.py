"""The CPU GEMMs for few rows (fastbert/cpu/few_rows_linear.py: bf16 on AMX, csrc/cpu/gemm/amx_bf16.cpp, or on
AVX512-BF16, csrc/cpu/gemm/avx512_bf16.cpp; fp32 on AVX-512, csrc/cpu/gemm/avx512_fp32.cpp) against a float64
reference, on fresh random inputs: every kernel this CPU runs, every activation, tails of rows and column
groups, 1-3 threads; and where they run (the plan and oneDNN's packed linear send at most max_rows rows to
them)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastbert.cpu import few_rows_linear, onednn_linear
from tests.helpers import assert_close_to_ref

DTYPES = [torch.float32, torch.bfloat16]
# bf16: fp32 accumulation of exact products, one bf16 rounding (2^-8 relative) at the end;
# fp32: the rounding of k fp32 FMAs (and the GELU/tanh approximations: ~1.5e-7 absolute)
RTOL = {torch.bfloat16: 2 ** -7, torch.float32: 1e-5}


def _problem_of(dtype):
    return few_rows_linear.problem(torch.empty(16, 32, dtype=dtype))


def needs_kernel(dtype):
    return pytest.mark.skipif(_problem_of(dtype) is not None, reason=f"few-rows GEMM unavailable: {_problem_of(dtype)}")


def each_dtype(test):
    params = [pytest.param(dtype, marks=needs_kernel(dtype), id=str(dtype).removeprefix("torch.")) for dtype in DTYPES]
    return pytest.mark.parametrize("dtype", params)(test)


def _runs_here(kernel):
    from fastbert.cpu.machine import machine

    module = few_rows_linear._module()
    return module is not None and hasattr(module, kernel.linear) and machine().runs(kernel.check)


# Every kernel, not only the one each dtype picks here: a CPU with AMX runs the AVX512-BF16 kernel too.
EACH_KERNEL = [
    pytest.param(dtype, kernel, id=kernel.linear,
                 marks=pytest.mark.skipif(not _runs_here(kernel), reason=f"this CPU has no {kernel.needs}"))
    for dtype in DTYPES for kernel in few_rows_linear._KERNELS[dtype]
]


@pytest.fixture
def forced_kernel(monkeypatch):
    """force(dtype, kernel): few_rows_linear runs `kernel` for dtype (as if it were the CPU's first choice)."""
    return lambda dtype, kernel: monkeypatch.setitem(few_rows_linear._chosen, dtype, kernel)


def _float64_reference(x, weight, bias, activation):
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    if activation == "tanh":
        return torch.tanh(y)
    if activation is None:
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def _problem(rows, in_features, out_features, dtype, with_bias=True):
    x = torch.randn(rows, in_features).to(dtype)
    weight = (torch.randn(out_features, in_features) / math.sqrt(in_features)).to(dtype)
    bias = torch.randn(out_features) if with_bias else None
    return x, weight, bias


def _assert_close(got, reference, dtype, in_features):
    torch.testing.assert_close(got.double(), reference, rtol=RTOL[dtype], atol=1e-4 * math.sqrt(in_features))


@pytest.mark.parametrize("dtype,kernel", EACH_KERNEL)
@pytest.mark.parametrize("activation", few_rows_linear.ACTIVATIONS)
@pytest.mark.parametrize("rows,in_features,out_features", [
    (1, 32, 16), (5, 64, 48), (16, 384, 384), (17, 96, 80), (40, 384, 1152), (33, 1536, 384), (130, 64, 112),
    (64, 64, 96), (7, 64, 208),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_reference(dtype, kernel, activation, rows, in_features, out_features, threads,
                                   forced_kernel):
    forced_kernel(dtype, kernel)
    x, weight, bias = _problem(rows, in_features, out_features, dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = few_rows_linear.few_rows_linear(x, few_rows_linear.packed_weight(weight), bias, activation, out_features)
    finally:
        torch.set_num_threads(previous)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    _assert_close(got, _float64_reference(x, weight, bias, activation), dtype, in_features)
    reference = few_rows_linear.few_rows_linear_ref(x, weight, bias, activation)
    torch.testing.assert_close(got, reference, rtol=RTOL[dtype], atol=1e-3)


@needs_kernel(torch.float32)
def test_fp32_takes_any_in_features():
    x, weight, bias = _problem(3, 37, 16, torch.float32)
    got = few_rows_linear.few_rows_linear(x, few_rows_linear.packed_weight(weight), bias, "gelu", 16)
    _assert_close(got, _float64_reference(x, weight, bias, "gelu"), torch.float32, 37)


@each_dtype
def test_without_bias_and_with_leading_dimensions(dtype):
    x, weight, _ = _problem(2 * 7, 64, 32, dtype, with_bias=False)
    got = few_rows_linear.few_rows_linear(x.view(2, 7, 64), few_rows_linear.packed_weight(weight), None, None, 32)
    assert got.shape == (2, 7, 32)
    _assert_close(got.view(14, 32), _float64_reference(x, weight, None, None), dtype, 64)


@each_dtype
def test_by_rows_sends_many_rows_to_the_large_gemm(dtype):
    x, weight, bias = _problem(few_rows_linear.MAX_ROWS + 1, 64, 32, dtype)
    calls = []
    run = few_rows_linear.by_rows(weight, bias, None, lambda rows: calls.append(rows.shape[0]) or rows[:, :32])
    run(x[: few_rows_linear.MAX_ROWS])
    assert calls == []
    run(x)
    assert calls == [few_rows_linear.MAX_ROWS + 1]


@pytest.mark.parametrize("dtype,kernel", EACH_KERNEL)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_by_rows_keeps_each_kernels_row_limit(dtype, kernel, activation, forced_kernel):
    forced_kernel(dtype, kernel)
    most = kernel.max_rows_gelu if activation else kernel.max_rows
    assert few_rows_linear.max_rows(dtype, activation) == most <= few_rows_linear.MAX_ROWS
    x, weight, bias = _problem(most + 1, 64, 32, dtype)
    calls = []
    run = few_rows_linear.by_rows(weight, bias, activation, lambda rows: calls.append(rows.shape[0]) or rows[:, :32])
    run(x[:most])
    run(x)
    assert calls == [most + 1]


def test_what_it_cannot_run_says_why():
    assert "out_features % 16" in few_rows_linear.problem(torch.empty(40, 32))
    assert "in_features % 32" in few_rows_linear.problem(torch.empty(16, 48, dtype=torch.bfloat16))
    assert "bf16 or fp32" in few_rows_linear.problem(torch.empty(16, 32, dtype=torch.float16))
    large = object()
    assert few_rows_linear.by_rows(torch.empty(40, 32), None, None, large) is large


@each_dtype
def test_bad_arguments_name_the_argument(dtype):
    x, weight, bias = _problem(4, 64, 32, dtype)
    packed = few_rows_linear.packed_weight(weight)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(ValueError, match="x must be a bf16 or fp32"):
        few_rows_linear.few_rows_linear(x.to(other), packed, bias, None, 32)
    with pytest.raises(ValueError, match="packed weight holds"):
        few_rows_linear.few_rows_linear(x, packed, bias, None, 48)
    with pytest.raises(ValueError, match="bias must be fp32"):
        few_rows_linear.few_rows_linear(x, packed, bias.bfloat16(), None, 32)
    with pytest.raises(ValueError, match="activation must be one of"):
        few_rows_linear.few_rows_linear(x, packed, bias, "relu", 32)


@each_dtype
def test_packed_copy_follows_in_place_changes(dtype):
    x, weight, bias = _problem(4, 64, 32, dtype)
    first = few_rows_linear.packed_weight(weight)
    assert few_rows_linear.packed_weight(weight) is first
    weight.mul_(2)
    again = few_rows_linear.packed_weight(weight)
    assert again is not first
    got = few_rows_linear.few_rows_linear(x, again, bias, None, 32)
    _assert_close(got, _float64_reference(x, weight, bias, None), dtype, 64)


@each_dtype
def test_packing_switch_turns_it_off(dtype):
    weight = torch.empty(16, 32, dtype=dtype)
    try:
        onednn_linear.set_packing(False)
        assert "switched off" in few_rows_linear.problem(weight)
        assert few_rows_linear.cache_bytes() == 0
    finally:
        onednn_linear.set_packing(True)
    assert few_rows_linear.problem(weight) is None


@each_dtype
def test_onednn_linear_runs_few_rows_on_it(dtype):
    x, weight, bias = _problem(16, 64, 32, dtype)
    few_rows_linear.clear_cache()
    with torch.no_grad():
        got = onednn_linear.linear_onednn(x, weight, bias, "gelu")
    assert few_rows_linear.cache_bytes() == 64 * 32 * x.element_size()
    _assert_close(got, _float64_reference(x, weight, bias, "gelu"), dtype, 64)


@needs_kernel(torch.bfloat16)
def test_autocast_packs_a_bf16_copy_of_an_fp32_weight():
    x, weight, bias = _problem(8, 64, 32, torch.float32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got = onednn_linear.linear_onednn(x, weight, bias)
    assert got.dtype == torch.bfloat16
    reference = _float64_reference(x.bfloat16(), weight.bfloat16(), bias, None)
    _assert_close(got, reference, torch.bfloat16, 64)


@each_dtype
def test_plan_runs_short_requests_on_it_and_matches_hf(dtype, monkeypatch):
    import transformers

    import fastbert

    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128)
    hf = transformers.BertModel(config).eval().to(dtype)  # transformers in the same dtype: the baseline
    model = fastbert.BertModel(config).eval().to(dtype)
    model.load_state_dict(hf.state_dict())
    exact = copy.deepcopy(hf).double()  # the same (rounded) weights, computed in fp64
    ids = torch.randint(0, 64, (1, 16))
    calls = []
    original = few_rows_linear.by_rows

    def counting_by_rows(weight, bias, activation, large):
        run = original(weight, bias, activation, large)
        assert run is not large
        return lambda x: calls.append(weight.shape[0]) or run(x)

    monkeypatch.setattr(few_rows_linear, "by_rows", counting_by_rows)
    with torch.inference_mode():
        got = model(input_ids=ids)
    assert calls == [3 * 64, 64, 128, 64] * 2 + [64]  # out_features: QKV, output, FFN in and out; the pooler
    assert_matches_transformers(got, hf, exact, ids)


def assert_matches_transformers(got, same_dtype_model, exact_model, ids):
    """The tolerance rule (was rtol = atol = 0.05 for bf16, against fp64 on the unrounded weights): within
    2 x transformers' own error in that dtype + ATOL[dtype]. bf16, measured with oneDNN's GEMMs on an
    AVX2 CPU: hidden state 0.028 against a bound of 0.076, pooler 0.002 against 0.014."""
    with torch.inference_mode():
        same, exact = same_dtype_model(input_ids=ids), exact_model(input_ids=ids)
    for name in ("last_hidden_state", "pooler_output"):
        assert_close_to_ref(got[name], same[name], exact[name], name=name)


@each_dtype
def test_plan_packs_for_onednn_only_once_a_call_has_many_rows(dtype):
    import transformers

    import fastbert

    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=512)
    model = fastbert.BertModel(config).to(dtype).eval()
    onednn_linear.clear_cache()

    def onednn_bytes():
        return onednn_linear.cache_bytes() - few_rows_linear.cache_bytes()

    with torch.inference_mode():
        model(input_ids=torch.randint(0, 64, (1, 16)))
        assert few_rows_linear.cache_bytes() > 0 and onednn_bytes() == 0
        model(input_ids=torch.randint(0, 64, (2, few_rows_linear.MAX_ROWS)))
    assert onednn_bytes() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_cpu_without_the_instructions_keeps_onednn(dtype, monkeypatch):
    """On a CPU without AMX or AVX512-BF16 (bf16) or AVX-512 (fp32), problem() says so and the plan keeps
    oneDNN's GEMM."""
    monkeypatch.setitem(few_rows_linear._chosen, dtype, None)
    weight = torch.randn(32, 64).to(dtype)
    large = object()
    assert few_rows_linear.by_rows(weight, None, None, large) is large
    if few_rows_linear._module() is None:
        pytest.skip(f"fastbert._C is not built, so problem() cannot name the missing instructions: "
                    f"{few_rows_linear.problem(weight)}")
    assert "this CPU has no" in few_rows_linear.problem(weight)
    assert few_rows_linear.max_rows(dtype, None) == 0 and few_rows_linear.kernel_name(dtype) is None


def test_both_bf16_kernels_take_one_packed_layout():
    """bf16_pack serves the AMX and the AVX512-BF16 kernel alike: the cache holds one copy per weight."""
    assert {kernel.pack for kernel in few_rows_linear._KERNELS[torch.bfloat16]} == {"bf16_pack"}
