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
enter the GEMMs with q and k: at 128 tokens 255 of v3's 512 rows. Inference projects every row once per
layer and keeps the tables until a parameter they read changes (_TABLES).

The embeddings run on the real tokens only (word embeddings, position embeddings when
position_biased_input, token types when type_vocab_size > 0, embed_proj, LayerNorm, dropout);
transformers' multiply by the mask is 1 on real tokens.
"""
from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from fastbert import backend

# ---- positions: the bucket of each distance, computed by transformers' own function ----------------------


@functools.lru_cache(maxsize=64)
def _bucket_table(max_seqlen: int, position_buckets: int, max_position: int, default_dtype: torch.dtype):
    """(bucket of each distance -(L-1)..L-1 as a CPU long tensor, its min, its max).

    make_log_bucket_position itself (its float32 log formula, default dtype and all), so every bucket is
    bitwise the one transformers' build_relative_position gives that distance."""
    max_seqlen = max(max_seqlen, 1)  # (an empty batch: distance 0 only)
    distances = torch.arange(1 - max_seqlen, max_seqlen, dtype=torch.long)
    if position_buckets > 0 and max_position > 0:  # build_relative_position's condition
        distances = hf.make_log_bucket_position(distances, position_buckets, max_position).to(torch.long)
    low, high = torch.aminmax(distances)
    return distances, int(low), int(high)


@dataclass
class RelativeState:
    """What every layer of one forward shares: the distance buckets, and how to get the normalized relative
    embeddings: once, on first use, in inference (a forward whose layers all find their tables cached
    never needs them); per layer when the forward records gradients, so that a checkpointed layer recomputes
    them itself (reentrant checkpointing backpropagates each layer on its own: a graph shared by the layers
    would be freed by the first)."""

    encoder: nn.Module
    buckets: torch.Tensor  # (2 * max_seqlen - 1,) long on the model's device: bucket(i - j) at i - j + L - 1
    low: int  # smallest and largest bucket in `buckets`, so a layer projects only the rows it can reach
    high: int
    per_layer: bool = False

    def rel_embeddings(self) -> torch.Tensor:
        """(2 * span, hidden): transformers' get_rel_embedding (the encoder's LayerNorm as a module call)."""
        return self.encoder.get_rel_embedding() if self.per_layer else self._once

    @functools.cached_property
    def _once(self) -> torch.Tensor:
        return self.encoder.get_rel_embedding()


def prepare(model: nn.Module, max_seqlen: int, training: bool = False) -> RelativeState:
    """Once per forward: the buckets of every distance a sequence of max_seqlen tokens has."""
    encoder = model.encoder
    table, low, high = _bucket_table(
        int(max_seqlen), encoder.position_buckets, encoder.max_relative_positions, torch.get_default_dtype())
    device = encoder.rel_embeddings.weight.device
    return RelativeState(encoder, table.to(device), low, high, per_layer=training or torch.is_grad_enabled())


def _projected(modules: dict, state: RelativeState, rows: slice, heads: int, head_dim: int, scale: float):
    """scale * (pos_key, pos_query) of the bucket rows `rows`, each (heads, head_dim, rows): the layer's key /
    query modules (called as modules: LoRA or a quantized wrapper on them counts) on rel_embeddings after
    the attention's pos_dropout, as in transformers."""
    relative = modules["attention"].pos_dropout(state.rel_embeddings())[rows]
    return tuple((modules[name](relative) * scale).view(-1, heads, head_dim).permute(1, 2, 0)
                 for name in ("key", "query"))


# Inference: pos_key / pos_query of every bucket row depend on weights only, so each attention module's
# are computed once and kept until a parameter they read changes (identity, version counter, storage).
# Outside the modules (deepcopy, pickle and torch.save never carry them); weak keys.
_TABLES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_VERSION = operator.attrgetter("_version")


def _plain(module) -> bool:
    return (type(module) in (nn.Linear, nn.LayerNorm) and module.weight is not None and module.bias is not None
            and not (module._forward_hooks or module._forward_pre_hooks))


def _table_sources(modules: dict, encoder: nn.Module) -> tuple | None:
    """The parameters the projected tables read, when they are all there is to them (plain modules, no
    dropout, no autograd); else None: project per forward."""
    from fastbert.models.plan import global_hooks  # (plan imports the family table, which imports this module)

    attention = modules["attention"]
    weight = encoder.rel_embeddings.weight
    if backend.records_autograd() or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if torch.is_autocast_enabled(weight.device.type):  # tables in autocast's dtype: not for other forwards
        return None
    if attention.pos_dropout.training and attention.pos_dropout.p > 0:
        return None
    norm = encoder.LayerNorm if "layer_norm" in encoder.norm_rel_ebd else None
    plain = (modules["key"], modules["query"]) + (() if norm is None else (norm,))
    if not all(map(_plain, plain)) or global_hooks():
        return None
    return tuple(p for module in plain for p in (module.weight, module.bias)) + (weight,)


def _position_tables(modules: dict, state: RelativeState, span: int, heads: int, head_dim: int, scale: float):
    """(pos_key, pos_query) * scale of every bucket row, (heads, head_dim, 2 * span) each, cached for inference."""
    every_row = slice(0, 2 * span)
    sources = _table_sources(modules, state.encoder)
    if sources is None:
        return None
    stamp = (*map(_VERSION, sources), *map(torch.Tensor.data_ptr, sources), scale, span,
             getattr(state.encoder, "LayerNorm", None) is not None and state.encoder.LayerNorm.eps)
    cached = _TABLES.get(modules["attention"])
    if cached is not None and cached[1] == stamp and all(map(operator.is_, cached[0], sources)):
        return cached[2]
    tables = tuple(t.contiguous() for t in _projected(modules, state, every_row, heads, head_dim, scale))
    _TABLES[modules["attention"]] = (sources, stamp, tables)  # one assignment: thread-safe
    return tables


def _per_bucket(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, head_dim) . (heads, head_dim, rows) -> (tokens, heads, rows), one GEMM per head."""
    return torch.matmul(x.transpose(0, 1), table).transpose(0, 1)


def relative_terms(modules: dict, state: RelativeState, q: torch.Tensor, k: torch.Tensor, scale: float):
    """One layer's (index, q_rel, k_rel) for fastbert.ops.relative_attention. q, k: (tokens, heads, head_dim).

    Only the bucket rows c() reaches are used (first..last). Scaling the small tables is scaling both terms."""
    span = modules["attention"].pos_ebd_size
    first, last = (min(max(b + span, 0), 2 * span - 1) for b in (state.low, state.high))
    heads, head_dim = q.shape[1], q.shape[2]
    tables = _position_tables(modules, state, span, heads, head_dim, scale)
    if tables is None:
        pos_key, pos_query = _projected(modules, state, slice(first, last + 1), heads, head_dim, scale)
    else:
        pos_key, pos_query = (t[:, :, first:last + 1] for t in tables)
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
        return prepare(model, layout.max_seqlen, layout.training)

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
