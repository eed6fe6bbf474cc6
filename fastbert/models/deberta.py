"""DeBERTa-v2/v3 (transformers' DebertaV2Model) on the fast encoder: disentangled attention as relative terms.

transformers' DisentangledSelfAttention scores query i and key j of one sequence (shared key/query
projections, pos_att_type c2p and p2c, scale = 1 / sqrt(head_dim * 3) on all three terms) as

    scale * (q_i . k_j  +  q_i . pos_key[c(i - j)]  +  k_j . pos_query[c(i - j)])

with c(d) = clamp(bucket(d) + span, 0, 2 * span - 1), bucket(d) transformers' log bucket of the
distance d (its p2c term reads -bucket(j - i), which is bucket(i - j): the bucket is odd), span the
attention's pos_ebd_size, pos_key / pos_query the layer's own key_proj / query_proj applied to the
encoder's (LayerNorm'ed) rel_embeddings. That is fastbert.ops.relative_attention with
index[d] = c(d), q_rel = scale * q . pos_key and k_rel = scale * k . pos_query, gathered per pair;
no (seq x seq) tensor is built. Only the buckets a batch can reach (distances up to max_seqlen - 1)
are projected: at 128 tokens that is 255 of v3's 512 rows.

The embeddings run on the real tokens only (word embeddings, position embeddings when
position_biased_input, token types when type_vocab_size > 0, embed_proj, LayerNorm, dropout);
transformers' multiply by the mask is 1 on real tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

# ---- positions: the bucket of each distance, computed by transformers' own function ----------------------


@functools.lru_cache(maxsize=64)
def _bucket_table(max_seqlen: int, position_buckets: int, max_position: int, default_dtype: torch.dtype):
    """(bucket of each distance -(L-1)..L-1 as a CPU long tensor, its min, its max).

    make_log_bucket_position itself (its float32 log formula, default dtype and all), so every bucket is
    bitwise the one transformers' build_relative_position gives that distance."""
    distances = torch.arange(1 - max_seqlen, max_seqlen, dtype=torch.long)
    if position_buckets > 0 and max_position > 0:  # build_relative_position's condition
        distances = hf.make_log_bucket_position(distances, position_buckets, max_position).to(torch.long)
    if distances.numel() == 0:
        return distances, 0, 0
    low, high = torch.aminmax(distances)
    return distances, int(low), int(high)


@dataclass
class RelativeState:
    """What every layer of one forward shares: the normalized relative embeddings and the distance buckets."""

    rel_embeddings: torch.Tensor  # (2 * span, hidden): encoder.get_rel_embedding(), LayerNorm applied
    buckets: torch.Tensor  # (2 * max_seqlen - 1,) long on the model's device: bucket(i - j) at i - j + L - 1
    low: int  # smallest and largest bucket in `buckets`, so a layer projects only the rows it can reach
    high: int


def prepare(model: nn.Module, max_seqlen: int) -> RelativeState:
    """Once per forward: transformers' get_rel_embedding (the encoder's LayerNorm, as a module call) and
    the buckets of every distance a sequence of max_seqlen tokens has."""
    encoder = model.encoder
    table, low, high = _bucket_table(
        int(max_seqlen), encoder.position_buckets, encoder.max_relative_positions, torch.get_default_dtype())
    rel_embeddings = encoder.get_rel_embedding()
    return RelativeState(rel_embeddings, table.to(rel_embeddings.device), low, high)


def _per_bucket(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, head_dim) . (rows, heads, head_dim) -> (tokens, heads, rows), one GEMM per head."""
    return torch.matmul(x.transpose(0, 1), table.permute(1, 2, 0)).transpose(0, 1)


def relative_terms(modules: dict, state: RelativeState, q: torch.Tensor, k: torch.Tensor, scale: float):
    """One layer's (index, q_rel, k_rel) for fastbert.ops.relative_attention.

    q, k: (tokens, heads, head_dim). pos_key / pos_query come from the layer's key / query modules
    (called as modules, so LoRA or a quantized wrapper on them counts), on the rows of rel_embeddings
    that c() reaches, after the attention's pos_dropout as in transformers. Scaling the small
    (rows, heads, head_dim) tables is scaling both terms."""
    attention = modules["attention"]
    span = attention.pos_ebd_size
    first, last = (min(max(b + span, 0), 2 * span - 1) for b in (state.low, state.high))
    rows = attention.pos_dropout(state.rel_embeddings)[first:last + 1]
    heads, head_dim = q.shape[1], q.shape[2]
    pos_key = modules["key"](rows).view(-1, heads, head_dim) * scale
    pos_query = modules["query"](rows).view(-1, heads, head_dim) * scale
    index = (state.buckets + span).clamp(0, 2 * span - 1) - first
    return index, _per_bucket(q, pos_key), _per_bucket(k, pos_query)


def config_problem(model: nn.Module) -> str | None:
    """Why this DebertaV2Model is not what the terms above compute, as a phrase for the plain path's
    warning; None when it is. Read from the modules' own attributes (what transformers' forward reads)."""
    encoder = model.encoder
    if not encoder.relative_attention:
        return "DeBERTa without relative_attention"
    if encoder.conv is not None:
        return f"DeBERTa's convolution layer (conv_kernel_size={model.config.conv_kernel_size})"
    if getattr(model, "z_steps", 0) > 1:
        return f"DeBERTa's z_steps={model.z_steps}"
    for layer in encoder.layer:
        attention = layer.attention.self
        if not attention.share_att_key:
            return "DeBERTa with share_att_key=False (separate pos_key_proj / pos_query_proj)"
        if sorted(attention.pos_att_type) != ["c2p", "p2c"]:
            return f"DeBERTa with pos_att_type={attention.pos_att_type} (fastbert runs exactly c2p and p2c)"
    return None


class DebertaRelative:
    """Family.relative for DeBERTa-v2/v3 (fastbert.models.relative): prepare / terms above.

    problem(model, arguments): configs and masks these terms do not cover run transformers' forward:
    see config_problem; and a 4-D attention_mask, which DebertaV2Encoder reads as a 0/1 (query, key)
    matrix (an additive mask would be read inverted there), so transformers' answer is kept."""

    shared_modules = (("encoder.rel_embeddings", nn.Embedding),)

    @staticmethod
    def prepare(model: nn.Module, layout) -> RelativeState:
        return prepare(model, layout.max_seqlen)

    @staticmethod
    def terms(modules: dict, shared: RelativeState, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple:
        return relative_terms(modules, shared, q, k, scale)

    @staticmethod
    def softmax_scale(modules: dict, head_dim: int, dtype: torch.dtype) -> float:
        return attention_scale(head_dim, dtype)

    @staticmethod
    def problem(model: nn.Module, arguments: dict) -> str | None:
        mask = arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            return f"DeBERTa with a {mask.dim()}-D attention_mask (read as a (query, key) 0/1 matrix there)"
        return config_problem(model)


DEBERTA_RELATIVE = DebertaRelative()


def unread_inputs(model: nn.Module) -> frozenset[str]:
    """Inputs DebertaV2Embeddings ignores: token_type_ids without a token-type table (type_vocab_size 0,
    while DeBERTa-v3's tokenizer still returns them), position_ids without absolute positions
    (position_biased_input False: then no sequence-length limit either, as in transformers)."""
    embeddings = model.embeddings
    if type(embeddings) is not hf.DebertaV2Embeddings:  # a subclass may read them: validated, passed on
        return frozenset()
    unread = set()
    if embeddings.token_type_embeddings is None:
        unread.add("token_type_ids")
    if not embeddings.position_biased_input or embeddings.position_embeddings is None:
        unread.add("position_ids")
    return frozenset(unread)


@functools.lru_cache(maxsize=32)
def attention_scale(head_dim: int, dtype: torch.dtype, scale_factor: int = 3) -> float:
    """1 / transformers' scaled_size_sqrt (sqrt(head_dim * scale_factor) in float32, then cast to the
    activations' dtype: in bf16 it divides by sqrt(192) rounded to 13.875)."""
    return 1.0 / float(torch.sqrt(torch.tensor(head_dim, dtype=torch.float) * scale_factor).to(dtype))


# ---- embeddings on packed tokens ---------------------------------------------------------------------------


def _table_or_none(module) -> bool:
    return module is None or type(module) is nn.Embedding


def embeddings_known(embeddings: nn.Module) -> bool:
    """True when embeddings_forward computes exactly what this DebertaV2Embeddings' forward does
    (embed_proj is any Linear-like module: it is called as a module)."""
    norm = embeddings.LayerNorm
    return (
        type(embeddings) is hf.DebertaV2Embeddings
        and type(norm) is nn.LayerNorm
        and type(embeddings.dropout) is nn.Dropout
        and type(embeddings.word_embeddings) is nn.Embedding
        and _table_or_none(embeddings.position_embeddings)
        and _table_or_none(embeddings.token_type_embeddings)
    )


def embeddings_forward(embeddings: nn.Module, inputs: dict, layout) -> torch.Tensor:
    """DebertaV2Embeddings on the real tokens: (tokens, hidden). Embeddings of another class (or with
    swapped pieces) run their own forward on the padded inputs, without the mask (1 on real tokens)."""
    if not embeddings_known(embeddings):
        arguments = {name: value for name, value in inputs.items() if value is not None}
        return layout.pack(embeddings(**arguments))
    batch, seqlen = layout.batch, layout.seqlen
    if inputs.get("input_ids") is not None:
        hidden = embeddings.word_embeddings(layout.pack(inputs["input_ids"]))
    else:
        hidden = layout.pack(inputs["inputs_embeds"])
    if embeddings.position_biased_input and embeddings.position_embeddings is not None:
        position_ids = inputs.get("position_ids")
        if position_ids is None:
            position_ids = embeddings.position_ids[:, :seqlen]
        hidden = hidden + embeddings.position_embeddings(layout.pack(position_ids.long().expand(batch, seqlen)))
    if embeddings.token_type_embeddings is not None:
        token_type_ids = inputs.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros((), dtype=torch.long, device=hidden.device)
        hidden = hidden + embeddings.token_type_embeddings(layout.pack(token_type_ids.expand(batch, seqlen)))
    if embeddings.embed_proj is not None:
        hidden = embeddings.embed_proj(hidden)
    return embeddings.dropout(embeddings.LayerNorm(hidden))
