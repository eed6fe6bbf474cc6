"""A BERT-table embeddings forward on the real tokens, written once for both forwards: the inference plan gives it
bound steps (plan.py), the live forward the modules themselves (encoder.embeddings_forward)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn


class EmbeddingSteps(NamedTuple):
    word: Callable  # packed ids -> rows
    position: Callable  # packed position ids -> rows
    token_type: Callable | None  # packed token type ids -> rows; None: the family has no token types
    norm: Callable  # (words, positions) -> LayerNorm(words + positions)
    # bound, fp32: the norm with token type 0's row added in the kernel (no token_type_ids given); in other
    # dtypes that add rounds first, so there it stays a separate add
    norm_first_type: Callable | None = None
    dropout: Callable | None = None  # live: the module's dropout


def embed(steps: EmbeddingSteps, family, module: nn.Module, inputs: dict, layout) -> torch.Tensor:
    """(tokens, embedding width). `inputs` holds input_ids or inputs_embeds, token_type_ids and position_ids, each
    (batch, seq) or None; positions default to what the family's embeddings compute (families.py)."""
    batch, seqlen = layout.batch, layout.seqlen
    ids = inputs.get("input_ids")
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = family.positions(module, ids, batch, seqlen)
    words = steps.word(layout.pack(ids)) if ids is not None else layout.pack(inputs["inputs_embeds"])
    positions = steps.position(layout.pack(position_ids.expand(batch, seqlen)))
    type_ids = inputs.get("token_type_ids")
    if steps.token_type is None:
        hidden = steps.norm(words, positions)
    elif type_ids is None and steps.norm_first_type is not None:
        hidden = steps.norm_first_type(words, positions)
    else:
        if type_ids is None:  # token type 0 everywhere
            type_ids = torch.zeros((), dtype=torch.long, device=positions.device)
        hidden = steps.norm(words + steps.token_type(layout.pack(type_ids.expand(batch, seqlen))), positions)
    return hidden if steps.dropout is None else steps.dropout(hidden)
