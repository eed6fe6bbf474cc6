"""Ahead-of-time compile of the row-wise kernels (bias_gelu, add_layer_norm) and ModernBERT's (geglu, rotary,
window attention) for sm_80 and sm_90 (no GPU needed): every launch configuration compiles, spills no
registers and fits in shared memory. Run normally (the attention kernels have their own file)."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed: no ahead-of-time compile check")

from fastbert.kernels import add_layer_norm, bias_gelu, geglu, rotary, window_attention  # noqa: E402
from fastbert.kernels.aot import CAPABILITIES, SHARED_LIMIT, aot_compile  # noqa: E402

CASES = (bias_gelu.AOT_CASES + add_layer_norm.AOT_CASES + geglu.AOT_CASES + rotary.AOT_CASES
         + window_attention.AOT_CASES)


def _case_id(case):
    name, _, signature, constexprs, num_warps, _ = case
    flags = "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    return f"{name}-{next(iter(signature.values()))[1:]}-{flags}-w{num_warps}"


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_compiles_without_spills(case, capability):
    name, fn, signature, constexprs, num_warps, num_stages = case
    usage = aot_compile(fn, signature, constexprs, capability, num_warps, num_stages)
    assert usage["spills"] == 0, f"{name} sm_{capability}: {usage}"
    assert usage["shared"] <= SHARED_LIMIT[capability], f"{name} sm_{capability}: {usage}"
    assert 0 < usage["registers"] <= 255
