"""rotary against transformers' apply_rotary_pos_emb formula in fp64 (forward and gradient), positions per
sequence from cu_seqlens, and the cos/sin tables against transformers' ModernBertRotaryEmbedding."""
from __future__ import annotations

import pytest
import torch
from transformers import ModernBertConfig
from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding, rotate_half

import fastbert
from fastbert.ops.rotary import RotaryTables, rotary, rotary_positions, rotary_ref
from tests.helpers import ATOL, assert_close_to_ref, check_against_reference


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_positions_restart_at_every_sequence():
    lengths = [3, 0, 1, 5]
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(rotary_positions(_cu_seqlens(lengths), sum(lengths)), expected)


def _angles(positions, head_dim, theta=10000.0):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return positions.double()[:, None] * inv_freq[None, :]


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_rotary_matches_transformers_in_fp64(head_dim):
    tokens, heads = 11, 3
    qkv = torch.randn(tokens, 3, heads, head_dim, dtype=torch.float64, requires_grad=True)
    angles = _angles(torch.randint(0, 500, (tokens,)), head_dim)
    ours = rotary(qkv, angles.cos(), angles.sin())
    # transformers' apply_rotary_pos_emb (which computes in fp32): x * cos + rotate_half(x) * sin with
    # cos/sin of the angles repeated over both halves; here in fp64.
    full = torch.cat((angles, angles), dim=-1)[:, None, :]
    q, k, v = qkv.unbind(1)
    theirs = torch.stack([q * full.cos() + rotate_half(q) * full.sin(),
                          k * full.cos() + rotate_half(k) * full.sin(), v], dim=1)
    assert (ours - theirs).abs().max().item() < 1e-12
    g = torch.randn_like(ours)
    (ours_grad,), (their_grad,) = torch.autograd.grad(ours, qkv, g), torch.autograd.grad(theirs, qkv, g)
    assert (ours_grad - their_grad).abs().max().item() < 1e-12


def rotary_formula(qkv, angles):
    """transformers' x * cos + rotate_half(x) * sin on q and k, v untouched, written out in qkv's dtype."""
    full = torch.cat((angles, angles), dim=-1)[:, None, :]
    cos, sin = full.cos().to(qkv.dtype), full.sin().to(qkv.dtype)
    q, k, v = qkv.unbind(1)
    half = qkv.shape[-1] // 2

    def rotate(x):
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    return torch.stack([rotate(q), rotate(k), v], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_torch_backend_against_fp64(dtype):
    # The torch backend returns rotary_ref when autograd records: both are checked against the formula.
    angles = _angles(torch.randint(0, 100, (9,)), 16)
    qkv = torch.randn(9, 3, 2, 16, dtype=dtype)
    with fastbert.use_backend("torch"):
        for fn in (rotary, rotary_ref):
            check_against_reference(lambda t, fn=fn: fn(t, angles.cos(), angles.sin()),
                                    lambda t: rotary_formula(t, angles), [qkv], ATOL[dtype], ["qkv"])
        with torch.no_grad():  # the five-pass path taken without autograd
            out = rotary(qkv, angles.cos(), angles.sin())
        assert_close_to_ref(out, rotary_formula(qkv, angles), rotary_formula(qkv.double(), angles), name="no-grad")


def test_tables_equal_transformers_cos_sin_and_follow_the_buffer():
    config = ModernBertConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64)
    rotary_emb = ModernBertRotaryEmbedding(config)
    tables = RotaryTables()
    positions = torch.tensor([[0, 5, 17, 63]])
    for layer_type in ("full_attention", "sliding_attention"):
        inv_freq = getattr(rotary_emb, f"{layer_type}_inv_freq")
        cos, sin = tables.lookup(inv_freq, positions[0], 64)
        hf_cos, hf_sin = rotary_emb(torch.zeros(1, dtype=torch.float32), positions, layer_type)
        assert torch.equal(cos, hf_cos[0, :, :8]) and torch.equal(sin, hf_sin[0, :, :8])
    inv_freq, tables = rotary_emb.full_attention_inv_freq, RotaryTables()
    before = tables.get(inv_freq, 8)[0]
    assert tables.get(inv_freq, 4)[0] is before  # cached, long enough
    grown = tables.get(inv_freq, 16)[0]
    assert grown.shape[0] == 16 and torch.equal(grown[:8], before)
    inv_freq.mul_(2)  # an in-place change invalidates the tables
    assert torch.equal(tables.get(inv_freq, 16)[0][1], inv_freq.cos())


def test_rotary_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="qkv must be"):
        rotary(torch.randn(4, 2, 1, 8), torch.randn(4, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="cos must have shape"):
        rotary(torch.randn(4, 3, 1, 8), torch.randn(4, 8), torch.randn(4, 4))


def test_rotary_without_autograd_matches_the_reference():
    angles = _angles(torch.randint(0, 300, (13,)), 32)
    qkv = torch.randn(13, 3, 4, 32)
    with torch.no_grad(), fastbert.use_backend("torch"):
        fast = rotary(qkv, angles.cos().float(), angles.sin().float())
    reference = rotary_ref(qkv.double(), angles.cos(), angles.sin())
    assert (fast.double() - reference).abs().max().item() < 1e-5
    assert torch.equal(fast[:, 2], qkv[:, 2])
