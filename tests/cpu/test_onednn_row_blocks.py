"""The bf16 packed GEMM on row blocks (fastbert/cpu/onednn_row_blocks.py): the same result as the whole GEMM,
run where the machine record says (AMX), 512..1024 rows, more than one thread."""
import math

import pytest
import torch

from fastbert.cpu import few_rows_linear, onednn_linear, onednn_row_blocks

_PROBLEM = onednn_linear.mkldnn_problem() or onednn_linear.bf16_problem()  # the blocks run oneDNN's bf16 GEMM
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def problem(rows, fan_in=64, fan_out=48):
    x = torch.randn(rows, fan_in).bfloat16()
    weight = (torch.randn(fan_out, fan_in) / math.sqrt(fan_in)).bfloat16()
    return x, weight, torch.randn(fan_out)


@pytest.mark.parametrize("attribute,algorithm", [("none", ""), ("gelu", "none"), ("gelu", "tanh")])
@pytest.mark.parametrize("amx", [False, True])
def test_blocks_give_the_whole_gemms_result(attribute, algorithm, amx, pretend_machine):
    pretend_machine(["avx512f", "avx512_bf16", "amx_bf16"] if amx else ["avx512f", "avx512_bf16"])
    x, weight, bias = problem(700)
    packed = onednn_linear.packed_weight(weight)
    assert onednn_row_blocks.uses_blocks(700, 2) == amx
    with torch.no_grad():
        whole = torch.ops.mkldnn._linear_pointwise(x, packed, bias, attribute, [], algorithm)
        got = onednn_row_blocks.bf16_linear(x, packed, bias, attribute, algorithm)
    assert torch.equal(got, whole)  # each row depends on that row alone, summed in the same order
    reference = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    if attribute == "gelu":
        reference = torch.nn.functional.gelu(reference, approximate=algorithm)
    assert (got.double() - reference).abs().max() < 5e-2  # bf16 output rounding


def test_linear_onednn_and_bf16_plans_use_it(monkeypatch):
    calls = []
    original = onednn_row_blocks.bf16_linear
    monkeypatch.setattr(onednn_row_blocks, "bf16_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, weight, bias = problem(few_rows_linear.MAX_ROWS + 8)  # fewer rows run the AMX GEMM where it runs
    with torch.no_grad():
        onednn_linear.linear_onednn(x, weight, bias.bfloat16())
        onednn_linear.linear_onednn(x.float(), weight.float(), bias)  # fp32: oneDNN's own threading is fine
    assert len(calls) == 1
    import transformers

    import fastbert

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    model = fastbert.BertModel(config).to(torch.bfloat16).eval()
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 64, (2, 130)))
    # the plan's four GEMMs per layer, and the pooler's unless its 2 rows ran on AMX
    assert len(calls) == 1 + 2 * 4 + (few_rows_linear.problem(weight) is not None)
