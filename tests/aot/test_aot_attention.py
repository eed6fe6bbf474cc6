"""Ahead-of-time compile of every Triton attention kernel config for sm_80 and sm_90 (no GPU needed).

Each case in fastbert.kernels.attention.AOT_CASES (every kernel with the block sizes the launchers pick,
fp16 and bf16, head_dim 32/64/128) and fastbert.kernels.relative_attention.AOT_CASES (fp16 and bf16,
head_dim 64/128) must compile with no register spill and with shared memory within the limit of
the architecture. Run normally (without TRITON_INTERPRET). The compiles run in a small process pool:
about 70 compilations.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from fastbert.kernels.host import triton_interpreting

pytest.importorskip("triton")
if triton_interpreting():
    pytest.skip("AOT compilation is meaningless under TRITON_INTERPRET=1", allow_module_level=True)

from fastbert.kernels import aot, attention, relative_attention  # noqa: E402

CASES = attention.AOT_CASES + relative_attention.AOT_CASES
JOBS = [(index, capability) for index in range(len(CASES)) for capability in aot.CAPABILITIES]


def _compile(job):
    """Compile one (case, capability) in a worker; returns the usage dict or the error text."""
    index, capability = job
    _, fn, signature, constexprs, num_warps, num_stages = CASES[index]
    try:
        return aot.aot_compile(fn, signature, constexprs, capability, num_warps, num_stages)
    except Exception as exc:  # reported by the test of this case
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def usage():
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(JOBS, pool.map(_compile, JOBS)))


def test_cases_cover_dtypes_head_dims_and_kernels():
    names = [case[0] for case in CASES]
    for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        for dtype in ("fp16", "bf16"):
            for head_dim in (32, 64, 128):
                assert f"attention_{kernel}_{dtype}_d{head_dim}_mask_dropout" in names


def test_relative_cases_cover_dtypes_head_dims_and_kernels():
    """The heaviest relative variant (c2p and p2c terms, dropout) of every kernel, fp16 and bf16, head_dim
    64 (MPNet-base, DeBERTa-v3-base) and 128, and MPNet's inference variant."""
    names = [case[0] for case in CASES]
    for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
        for dtype in ("fp16", "bf16"):
            for head_dim in (64, 128):
                assert f"relative_attention_{kernel}_{dtype}_d{head_dim}_c2p_p2c_dropout" in names
        assert f"relative_attention_{kernel}_bf16_d64_bias" in names


@pytest.mark.parametrize("capability", aot.CAPABILITIES, ids=lambda c: f"sm_{c}")
@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_compiles_without_spills_within_shared_memory(usage, index, capability):
    result = usage[(index, capability)]
    assert isinstance(result, dict), f"compile failed: {result}"
    assert result["spills"] == 0, f"{result['spills']} bytes of register spills ({result})"
    assert result["shared"] <= aot.SHARED_LIMIT[capability], f"shared memory over the limit ({result})"
    assert 0 < result["registers"] <= 255
