"""fastbert/ops/_shared.py: the per-sequence loop of the packed-attention references and the "torch" + "triton"
registrations that several op modules make through it."""
from __future__ import annotations

import pytest
import torch

from fastbert.backend import REGISTRY
from fastbert.kernels import limits as triton_limits
from fastbert.ops._shared import packed_attention_ref, triton_attention_problem, triton_cpu_problem
from fastbert.ops.attention import varlen_attention_ref
from fastbert.registry import Signature


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("lengths", [[5, 0, 9, 1], [7]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_without_adjustment_it_is_the_varlen_reference(dtype, lengths):
    q, k, v = (torch.randn(sum(lengths), 2, 8, dtype=dtype) for _ in range(3))
    cu = _cu_seqlens(lengths)
    out = packed_attention_ref(q, k, v, cu, softmax_scale=0.3)
    assert out.dtype == dtype
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu, max(lengths), softmax_scale=0.3),
                               rtol=0, atol=1e-6 if dtype != torch.bfloat16 else 1e-2)


def test_adjust_scores_sees_each_sequence_scaled_scores_and_bounds():
    lengths = [3, 0, 4]
    q, k, v = (torch.randn(sum(lengths), 2, 4, dtype=torch.float64) for _ in range(3))
    seen = []

    def adjust(scores, start, end):
        seen.append((start, end, tuple(scores.shape)))
        one_q, one_k = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
        torch.testing.assert_close(scores, one_q @ one_k.transpose(-1, -2) * 0.5)
        if end - start < 2:
            return scores
        return scores.masked_fill(torch.eye(end - start, dtype=torch.bool), float("-inf"))

    out = packed_attention_ref(q, k, v, _cu_seqlens(lengths), softmax_scale=0.5, adjust_scores=adjust)
    assert seen == [(0, 3, (2, 3, 3)), (3, 3, (2, 0, 0)), (3, 7, (2, 4, 4))]
    # no query attends to itself: the output of row i is a mix of the other rows' values only
    probs = torch.softmax((q[:3].transpose(0, 1) @ k[:3].transpose(0, 1).transpose(-1, -2) * 0.5)
                          .masked_fill(torch.eye(3, dtype=torch.bool), float("-inf")), dim=-1)
    torch.testing.assert_close(out[:3], (probs @ v[:3].transpose(0, 1)).transpose(0, 1))


def test_no_sequence_gives_zeros():
    q = torch.randn(4, 2, 8)
    out = packed_attention_ref(q, q, q, torch.zeros(1, dtype=torch.int32))
    assert torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize("op", ["bias_gelu", "add_layer_norm", "geglu", "rotary", "relative_attention",
                                "window_attention"])
def test_torch_and_triton_registrations(op):
    torch_impl, triton_impl = REGISTRY.get(op, "torch"), REGISTRY.get(op, "triton")
    assert (torch_impl.devices, torch_impl.dtypes, torch_impl.supports) == (None, None, None)
    assert (triton_impl.devices, triton_impl.dtypes) == (triton_limits.DEVICES, triton_limits.DTYPES)
    assert torch_impl.binder == triton_impl.binder
    assert REGISTRY.backends_of(op).index("torch") < REGISTRY.backends_of(op).index("triton")
    on_cpu = Signature(op, "cpu", torch.float32, width=64, head_dim=64)
    assert triton_impl.supports(on_cpu) == triton_cpu_problem(on_cpu) is not None


def test_triton_attention_problem_adds_the_head_dim_limit():
    wide = Signature("window_attention", "cuda", torch.float16, head_dim=triton_limits.ATTENTION_MAX_HEAD_DIM + 1)
    assert triton_attention_problem(wide) == triton_limits.attention_head_dim_problem(wide.head_dim) is not None
    assert triton_attention_problem(wide._replace(head_dim=64)) is None
