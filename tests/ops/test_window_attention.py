"""window_attention: the blocked implementation against the per-sequence reference (fp64, forward and
every gradient), the reference against an independent per-query formula and transformers' sliding
window mask, and the O(tokens x window) shape of the work."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import ModernBertConfig
from transformers.masking_utils import create_bidirectional_sliding_window_mask

import fastbert
from fastbert.ops.window_attention import plan_for, window_attention, window_attention_ref
from tests.helpers import ATOL, check_against_reference

# Lengths: empty sequences, single tokens, shorter than / equal to / longer than a block and the window.
LENGTHS = [[5, 17, 1, 40, 0, 33], [1], [64], [0, 3], [100, 2]]


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(lengths, heads=2, head_dim=8, dtype=torch.float32):
    return [torch.randn(sum(lengths), heads, head_dim, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("window", [0, 1, 4, 16, 200])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocked_matches_reference_forward_and_gradients(dtype, lengths, window):
    cu = _cu_seqlens(lengths)
    with fastbert.use_backend("torch"):
        check_against_reference(
            lambda q, k, v: window_attention(q, k, v, cu, max(lengths), window),
            lambda q, k, v: window_attention_ref(q, k, v, cu, max(lengths), window),
            _qkv(lengths, dtype=dtype), ATOL[dtype], names=["q", "k", "v"])


def test_reference_matches_a_per_query_formula():
    lengths, window = [9, 1, 14], 3
    cu = _cu_seqlens(lengths)
    q, k, v = (t.double() for t in _qkv(lengths))
    out = window_attention_ref(q, k, v, cu, 14, window, softmax_scale=0.7)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for i in range(start, end):
            keys = range(max(start, i - window), min(end, i + window + 1))
            scores = torch.stack([(q[i] * k[j]).sum(-1) * 0.7 for j in keys])  # (keys, heads)
            probs = torch.softmax(scores, dim=0)
            expected = sum(p[:, None] * v[j] for p, j in zip(probs, keys))
            assert (out[i] - expected).abs().max().item() < 1e-12


def test_window_is_transformers_sliding_window_mask():
    """transformers lets query i see key j when |i - j| <= config.sliding_window (= local_attention // 2)."""
    config = ModernBertConfig(local_attention=8, hidden_size=16, num_attention_heads=1)
    config._attn_implementation = "eager"
    mask = create_bidirectional_sliding_window_mask(config=config, inputs_embeds=torch.zeros(1, 20, 16),
                                                    attention_mask=torch.ones(1, 20, dtype=torch.long))
    allowed = mask[0, 0] == 0 if mask.dtype != torch.bool else mask[0, 0]
    i = torch.arange(20)
    assert torch.equal(allowed, (i[:, None] - i[None, :]).abs() <= config.sliding_window)


def test_work_is_tokens_times_window():
    """The band plan scores each query against block + 2 * window keys, however long the sequence."""
    window, lengths = 16, [4096, 300]
    plan = plan_for(_cu_seqlens(lengths), sum(lengths), window)
    blocks_needed = sum(math.ceil(n / plan.block) for n in lengths)
    assert plan.blocks == blocks_needed
    assert tuple(plan.mask.shape) == (blocks_needed, 1, plan.block, plan.block + 2 * window)
    assert plan.mask.numel() <= (sum(lengths) + len(lengths) * plan.block) * (plan.block + 2 * window)


def test_plan_is_rebuilt_when_cu_seqlens_changes_in_place():
    cu = _cu_seqlens([10, 10])
    first = plan_for(cu, 20, 2)
    assert plan_for(cu, 20, 2) is first
    cu[1] = 5
    assert plan_for(cu, 20, 2) is not first


def test_dropout_keeps_the_band():
    """With dropout, keys outside the window still get no weight: v outside the band never leaks in."""
    lengths, window = [30], 2
    cu = _cu_seqlens(lengths)
    q, k, v = _qkv(lengths)
    v = torch.zeros_like(v)
    v[20:] = 1.0
    out = window_attention(q, k, v, cu, 30, window, dropout_p=0.5)
    assert out[:17].abs().max().item() == 0.0


def test_arguments_are_checked():
    q, k, v = _qkv([4])
    with pytest.raises(ValueError, match="window must be >= 0"):
        window_attention(q, k, v, _cu_seqlens([4]), 4, -1)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        window_attention(q, k, v, _cu_seqlens([4]).long(), 4, 1)
    with pytest.raises(ValueError, match="dropout_p"):
        window_attention(q, k, v, _cu_seqlens([4]), 4, 1, dropout_p=1.0)


def test_plan_of_an_inference_tensor_follows_its_values():
    with torch.inference_mode():
        cu = _cu_seqlens([10, 10])
        first = plan_for(cu, 20, 2)
        assert plan_for(cu, 20, 2) is first
        cu[1] = 5
        assert plan_for(cu, 20, 2) is not first
