"""The Triton kernels' stated limits (kernels/limits.py, read by the registry) match what the kernels take,
and the AOT report covers every kernel module or fails. Needs triton, no GPU."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton")

from fastbert.kernels import add_layer_norm as triton_add_layer_norm  # noqa: E402
from fastbert.kernels import aot, limits  # noqa: E402
from fastbert.kernels import attention as triton_attention  # noqa: E402


def test_attention_takes_every_head_dim_up_to_its_limit_and_refuses_past_it():
    for head_dim in range(1, limits.ATTENTION_MAX_HEAD_DIM + 1):
        block_d = triton_attention._config(head_dim)[0]
        assert block_d >= head_dim and block_d in triton_attention._CONFIGS, head_dim
    with pytest.raises(ValueError, match=f"head_dim up to {limits.ATTENTION_MAX_HEAD_DIM}, got 129"):
        triton_attention._config(limits.ATTENTION_MAX_HEAD_DIM + 1)


def test_layer_norm_launches_up_to_its_limit_and_refuses_past_it():
    assert triton_add_layer_norm._launch_config(limits.LAYER_NORM_MAX_WIDTH, backward=True)[0] >= 4096
    with pytest.raises(ValueError, match=f"rows of at most {limits.LAYER_NORM_MAX_WIDTH} elements"):
        triton_add_layer_norm._launch_config(limits.LAYER_NORM_MAX_WIDTH + 1)


def test_aot_report_fails_when_a_kernel_module_does_not_import(monkeypatch):
    """No kernel module is optional: a broken one must not silently drop out of the AOT report."""
    monkeypatch.setitem(sys.modules, "fastbert.kernels.attention", None)
    with pytest.raises(ImportError):
        aot.collect_cases()
