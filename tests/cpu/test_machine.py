"""The machine record (fastbert/cpu/machine.py): one read of the CPU, and every CPU-dependent choice as a rule of it."""
import math

import pytest

from fastbert import backend
from fastbert.cpu import attention as cpu_attention
from fastbert.cpu import few_rows_linear, int8_linear, machine, onednn_row_blocks

AMX_XEON = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
ZEN4 = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
AVX2_ONLY = ["avx2"]
GRANTED = {"amx_bf16_gemm": True, "avx512_bf16_gemm": True, "avx512_fp32_gemm": True}
TILES_REFUSED = {**GRANTED, "amx_bf16_gemm": False}  # a VM that lists AMX and refuses the tile state


def choices():
    return {name: machine.choice(name) for name in machine.CHOICES}


def test_an_amx_xeon(pretend_machine):
    pretend_machine(AMX_XEON, GRANTED)
    assert choices() == {
        "varlen_attention_order": ("torch",), "fused_qkv_max_seqlen": cpu_attention.SHORT_SEQLEN,
        "int8_zero_point": 0, "int8_gemm": True, "bf16_row_blocks": True, "serve_bf16": ("amx_bf16", "avx512_bf16"),
        "onednn_fp32_max_rows": math.inf, "gelu_epilogue": True,
    }


@pytest.mark.parametrize("kernels", [None, TILES_REFUSED])
def test_amx_counts_only_when_its_tiles_are_granted(pretend_machine, kernels):
    """Listed AMX with the tiles refused is an AVX-512 machine for every choice; without the extension the
    listing decides."""
    pretend_machine(AMX_XEON, kernels)
    granted = kernels is None
    assert machine.choice("varlen_attention_order") == (("torch",) if granted else ("cpp", "torch"))
    assert machine.choice("int8_zero_point") == (0 if granted else 128)
    assert machine.choice("fused_qkv_max_seqlen") == (cpu_attention.SHORT_SEQLEN if granted else math.inf)
    assert machine.choice("bf16_row_blocks") is granted


def test_an_avx512_epyc(pretend_machine):
    pretend_machine(ZEN4, TILES_REFUSED)
    assert choices() == {
        "varlen_attention_order": ("cpp", "torch"), "fused_qkv_max_seqlen": math.inf, "int8_zero_point": 128,
        "int8_gemm": True, "bf16_row_blocks": False, "serve_bf16": ("avx512_bf16",),
        "onednn_fp32_max_rows": math.inf, "gelu_epilogue": True,
    }


def test_an_avx2_only_cpu(pretend_machine):
    pretend_machine(AVX2_ONLY, {name: False for name in GRANTED})
    assert choices()["int8_gemm"] is False and choices()["serve_bf16"] == ()
    # oneDNN's fp32 GEMM only for few rows, and GELU after it (benchmarks/cpu_linear_order.py on the AVX2 EPYC)
    assert choices()["onednn_fp32_max_rows"] == machine.AVX2_ONEDNN_FP32_MAX_ROWS
    assert choices()["gelu_epilogue"] is False
    from fastbert import extension

    if extension.load_problem() is None:  # (without _C, problem() names the missing extension first)
        assert "no VNNI" in int8_linear.problem.__wrapped__()  # the refusal names what is missing


def test_the_consumers_read_the_record(pretend_machine):
    pretend_machine(AMX_XEON, GRANTED)
    assert backend.REGISTRY.auto_order("varlen_attention", "cpu") == ("torch",)
    assert cpu_attention.fused_qkv_max_seqlen() == cpu_attention.SHORT_SEQLEN
    assert int8_linear.activation_zero_point() == 0 and int8_linear.vnni_present()
    pretend_machine(ZEN4)
    assert backend.REGISTRY.auto_order("varlen_attention", "cpu") == ("cpp", "torch")
    assert int8_linear.activation_zero_point() == 128


def test_row_blocks_run_by_the_table_only(pretend_machine):
    """With granted AMX, 512..1024 rows on more than one thread run in blocks; no call is timed to decide."""
    pretend_machine(AMX_XEON, GRANTED)
    assert [onednn_row_blocks.uses_blocks(rows, 2) for rows in (511, 512, 1024, 1025)] == [False, True, True, False]
    assert not onednn_row_blocks.uses_blocks(700, 1)
    pretend_machine(AMX_XEON, TILES_REFUSED)
    assert not onednn_row_blocks.uses_blocks(700, 2)


def test_few_rows_kernels_follow_the_records_extension_checks(pretend_machine, monkeypatch):
    import torch

    if few_rows_linear._module() is None:
        pytest.skip("fastbert._C is not built: no few-rows kernel runs (tests/models/test_without_extension.py)")
    monkeypatch.setattr(few_rows_linear, "_chosen", {})
    pretend_machine(ZEN4, {**TILES_REFUSED, "avx512_bf16_gemm": True})
    assert few_rows_linear._kernel(torch.bfloat16).name == "AVX512-BF16"
    monkeypatch.setattr(few_rows_linear, "_chosen", {})
    pretend_machine(AVX2_ONLY, {name: False for name in GRANTED})
    assert few_rows_linear._kernel(torch.bfloat16) is None and few_rows_linear._kernel(torch.float32) is None


def test_the_real_record_matches_proc_cpuinfo():
    from fastbert.cpu.info import cpu_features

    record = machine.machine()
    assert record.features == frozenset(cpu_features())
    assert machine.machine() is record  # read once
    if record.kernels is not None:
        assert set(record.kernels) == set(machine.EXTENSION_CHECKS)


def test_every_choice_names_the_benchmark_that_decided_it():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for choice in machine.CHOICES.values():
        script = choice.benchmark.split()[0] if choice.benchmark.startswith("benchmarks/") else None
        assert choice.says and choice.benchmark, choice.name
        if script:
            assert (root / script.rstrip(",")).exists(), choice.benchmark


def test_a_misspelled_choice_fails_at_once():
    with pytest.raises(KeyError):
        machine.MachineChoice("varlen_attention_ordr")
