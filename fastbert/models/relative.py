"""The relative-position hook of the one encoder: attention scores with relative-position terms.

A family whose attention adds relative-position terms to its scores (MPNet's bucketed bias, DeBERTa's
disentangled terms) declares them in `Family.relative` (None for the absolute-position families). The
object there has:

- `shared_modules`: ((attribute path from the base model, exact class), ...): the modules it reads
  outside the layers' pieces (MPNet: "encoder.relative_attention_bias", an nn.Embedding). The module
  check (support.py) requires exactly these classes, as for every other module, and stamps them;
- `prepare(model, layout) -> shared`: once per forward, before the first layer, from the base model and
  the forward's TokenLayout (batch, seqlen, max_seqlen, dense or packed): what every layer shares;
- `terms(modules, shared, q, k, scale) -> (index, q_rel, k_rel)`: per layer, from the layer's pieces
  (`LayerView.pieces`: piece name -> module), `shared`, the layer's packed q and k (tokens, heads,
  head_dim) and its softmax scale: the arguments of `fastbert.ops.relative_attention.relative_attention`
  (index (2 * max_seqlen - 1,) integer, bucket of distance i - j at i - j + max_seqlen - 1; q_rel,
  k_rel (tokens, heads, buckets) or None);
- optional `softmax_scale(modules, head_dim, dtype) -> float`: the layer's softmax scale when it is not
  the attention module's `scaling` / head_dim ** -0.5 (DeBERTa: 1 / sqrt(3 * head_dim), on all three terms);
- optional `problem(model, arguments) -> str | None`: per forward, why this model or call is outside what
  the terms compute (a config, a mask), as a phrase for the plain path's warning; None when it is not.

The encoder keeps (hook, shared) in `TokenLayout.relative` and its layers' self-attention call
`relative_attention` on packed tokens (a dense batch passes cu_seqlens = arange(0, (batch+1)*seq, seq),
`TokenLayout.offsets`). Packing keeps distances only when each sequence's tokens are one contiguous run,
so a mask with holes runs transformers' forward (native.py). Inference plans do not bind these terms: a
family with a hook runs the general forward (encoder.encode).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers.models.mpnet import modeling_mpnet


class RelativePositions(Protocol):
    """What `Family.relative` holds (see the module docstring)."""

    shared_modules: tuple[tuple[str, type], ...]

    def prepare(self, model: nn.Module, layout) -> object: ...

    def terms(self, modules: dict, shared: object, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple: ...


# MPNetEncoder.forward calls compute_position_bias with its default num_buckets=32 (and the bucket
# function's default max_distance=128), whatever config.relative_attention_num_buckets says.
MPNET_BUCKETS = 32


class MPNetRelativeBias:
    """MPNet: one learned bias per (bucket, head), computed once per forward and added by every layer.

    transformers buckets relative_position = key_pos - query_pos; the op's index is by i - j (query
    minus key), so index[t] = bucket(max_seqlen - 1 - t), from transformers' own bucket function (the
    same integer/float arithmetic, so the same buckets bitwise)."""

    shared_modules = (("encoder.relative_attention_bias", nn.Embedding),)

    def prepare(self, model: nn.Module, layout) -> tuple[torch.Tensor, torch.Tensor]:
        weight = model.encoder.relative_attention_bias.weight  # (buckets, heads)
        if weight.shape[0] < MPNET_BUCKETS:
            raise ValueError(f"encoder.relative_attention_bias has {weight.shape[0]} rows; MPNet's attention "
                             f"reads {MPNET_BUCKETS} buckets")
        last = max(layout.max_seqlen, 1) - 1
        distance = torch.arange(last, -last - 1, -1, device=weight.device)  # key - query, for i - j = -last..last
        index = modeling_mpnet.MPNetEncoder.relative_position_bucket(distance, num_buckets=MPNET_BUCKETS)
        return index, weight.t()[None]  # (1, heads, buckets): q_rel's rows, one per token by expand

    def terms(self, modules: dict, shared: tuple, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple:
        index, table = shared
        return index, table.expand(q.shape[0], -1, -1), None


MPNET_RELATIVE = MPNetRelativeBias()
