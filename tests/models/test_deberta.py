"""DeBERTa-v2/v3 against transformers: one layer's disentangled attention, then (below) whole models.

Random-init small configs shaped like deberta-v3 (log buckets, shared key/query projections,
c2p + p2c, LayerNorm'ed relative embeddings, no absolute positions, no token types), fresh random
batches, sequences longer than position_buckets so that the log buckets and the clamp count.
"""
import pytest
import torch
import transformers
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from fastbert.models import deberta
from fastbert.ops.relative_attention import relative_attention
from tests.helpers import max_error, padding_mask


def deberta_config(**overrides) -> transformers.DebertaV2Config:
    """deberta-v3-base's shape, small: 8 log buckets over max_relative_positions -1 (-> 64 positions)."""
    values = dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=1e-7, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pooler_dropout=0.0, num_labels=2, pad_token_id=0,
    )
    values.update(overrides)
    return transformers.DebertaV2Config(**values)


# ---- the buckets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buckets,max_position", [(8, 64), (256, 512), (4, 24), (-1, 64)])
@pytest.mark.parametrize("length", [1, 5, 40, 700])
def test_bucket_of_each_distance_is_transformers(buckets, max_position, length):
    """The (2L-1,) table read at i - j + L - 1 is build_relative_position's (L, L) matrix, bitwise."""
    table, low, high = deberta._bucket_table(length, buckets, max_position, torch.get_default_dtype())
    x = torch.zeros(1, length, 1)
    expected = hf.build_relative_position(x, x, bucket_size=buckets, max_position=max_position)[0]
    position = torch.arange(length)
    assert torch.equal(table[position[:, None] - position[None, :] + length - 1], expected)
    assert (low, high) == (expected.min().item(), expected.max().item())
    assert torch.equal(table, -table.flip(0))  # odd: the p2c term's -bucket(j - i) is bucket(i - j)


# ---- one layer's attention ----------------------------------------------------------------------------------


def _hf_attention(module, config, hidden, mask, rel_embeddings):
    encoder = hf.DebertaV2Encoder(config)
    relative_pos = encoder.get_rel_pos(hidden)
    return module(hidden, encoder.get_attention_mask(mask), relative_pos=relative_pos,
                  rel_embeddings=rel_embeddings)[0]


def _fast_attention(module, config, hidden, mask, rel_embeddings):
    keep = mask.bool()
    lengths = keep.sum(-1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    packed = hidden[keep]
    heads, head_dim = module.num_attention_heads, module.attention_head_size
    projections = (module.query_proj, module.key_proj, module.value_proj)
    q, k, v = (proj(packed).view(-1, heads, head_dim) for proj in projections)
    state = deberta.RelativeState(rel_embeddings, *_table(int(lengths.max()), config))
    scale = deberta.attention_scale(head_dim, hidden.dtype)
    modules = dict(attention=module, query=module.query_proj, key=module.key_proj)
    index, q_rel, k_rel = deberta.relative_terms(modules, state, q, k, scale)
    context = relative_attention(q, k, v, cu_seqlens, int(lengths.max()), index, q_rel=q_rel, k_rel=k_rel,
                                 softmax_scale=scale)
    return context.reshape(packed.shape[0], -1)


def _table(max_seqlen, config):
    max_position = config.max_relative_positions
    max_position = max_position if max_position > 0 else config.max_position_embeddings
    return deberta._bucket_table(max_seqlen, config.position_buckets, max_position, torch.get_default_dtype())


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("buckets", [8, -1])
def test_one_layer_matches_disentangled_self_attention(side, dtype, tol, buckets):
    config = deberta_config(position_buckets=buckets, max_relative_positions=24 if buckets < 0 else -1)
    torch.manual_seed(1)
    module = hf.DisentangledSelfAttention(config).to(dtype).eval()
    lengths, seqlen = [40, 3, 17, 1], 40  # longer than 2 * position_buckets: log buckets and clamp both reached
    mask = padding_mask(lengths, seqlen, side)
    hidden = torch.randn(len(lengths), seqlen, config.hidden_size, dtype=dtype)
    rel_embeddings = hf.DebertaV2Encoder(config).to(dtype).get_rel_embedding().detach()
    rel_embeddings = rel_embeddings + torch.randn_like(rel_embeddings)  # not the LayerNorm's fixed point
    with torch.no_grad():
        expected = _hf_attention(module, config, hidden, mask, rel_embeddings)[mask.bool()]
        out = _fast_attention(module, config, hidden, mask, rel_embeddings)
    assert max_error(out, expected) <= tol


def test_one_layer_gradients_match():
    """Every parameter of the attention and the relative embeddings, through the c2p and p2c GEMMs."""
    config = deberta_config()
    torch.manual_seed(2)
    module = hf.DisentangledSelfAttention(config).double()
    lengths, seqlen = [30, 11], 30
    mask = padding_mask(lengths, seqlen, "right")
    hidden = torch.randn(2, seqlen, config.hidden_size, dtype=torch.float64)
    rel = torch.randn(2 * config.position_buckets, config.hidden_size, dtype=torch.float64)
    grads = []
    for run in (_hf_attention, _fast_attention):
        module.zero_grad()
        leaf = rel.clone().requires_grad_()
        out = run(module, config, hidden, mask, leaf)
        out = out[mask.bool()] if out.dim() == 3 else out
        out.pow(2).sum().backward()
        grads.append([leaf.grad, *(p.grad for p in module.parameters())])
    for mine, theirs in zip(*grads):
        assert max_error(mine, theirs) <= 1e-10
