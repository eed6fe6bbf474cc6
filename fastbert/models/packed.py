"""fastbert.encode_packed: the encoder on sequences given back to back, without a padded batch.

input_ids holds every sequence's tokens one after the other, cu_seqlens (batch + 1,) int32 where each
sequence starts (the varlen convention of FlashAttention and of fastbert's own attention ops). The
layout comes from cu_seqlens directly (TokenLayout.from_cu_seqlens: no mask read, no gather of ids),
each token gets the position the family's embeddings give it in its own sequence, and encoder.encode
runs the same embeddings and layers as a padded call, on the inference plan when it applies.

The result is the padded path's for the same sequences: bitwise in fp32 where the padded batch has
padding (both run one packed layout, hence the same kernels); a padded batch whose sequences all have one
length stays dense there and attends on the dense kernel (agreement within 1e-6).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from fastbert.models import deberta
from fastbert.models.encoder import TokenLayout, encode, fast_layer_class
from fastbert.models.families import Family, column_positions, family_of_base, padding_offset_positions
from fastbert.models.native import FastEncoder, relative_problem
from fastbert.models.support import check_modules, embeddings_known
from fastbert.models.validation import should_validate, validate_inputs

POOLING_MODES = ("mean", "cls")
# Family.embed -> the check that it computes exactly what the embeddings module's forward does
_EMBED_KNOWN = {deberta.embeddings_forward: deberta.embeddings_known}


class PackedOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (tokens, hidden) in the model's dtype, sequences back to back
    pooled: torch.Tensor | None  # (batch, hidden) float32 when pooling was asked, else None


def encode_packed(model: nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, *,
                  token_type_ids: torch.Tensor | None = None, pooling: str | None = None,
                  validate: bool | None = None) -> PackedOutput:
    """The encoder's output for sequences packed back to back.

    model: a fastbert model of a BERT-table family (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT,
    ALBERT, MPNet, DeBERTa-v2/v3), native or patched, or a transformers base model of one; a head model
    runs its base model (the head is not applied: classify_packed applies a sequence classifier's).
    input_ids (tokens,) int64; cu_seqlens (batch + 1,) int32,
    0 first, non-decreasing, input_ids' length last; token_type_ids (tokens,) int64 or None (type 0).
    Positions restart at each sequence, as the family's embeddings number a sequence alone.
    pooling: "mean" (over each sequence's tokens) or "cls" (its first token's hidden state, not the
    model's pooler), accumulated and returned in float32; None for no pooling.
    validate: range checks of ids and token types (the model forward's `validate`); cu_seqlens is always checked.
    """
    if pooling is not None and pooling not in POOLING_MODES:
        raise ValueError(f"pooling={pooling!r}: expected one of {', '.join(POOLING_MODES)} or None")
    base, _, result = _encode_packed(model, input_ids, cu_seqlens, token_type_ids, validate)
    if result is None:
        return _empty(base, cu_seqlens, pooling)
    hidden = result.last_hidden_state[0]
    return PackedOutput(hidden, None if pooling is None else pool_packed(hidden, cu_seqlens, pooling))


def _encode_packed(model: nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                   token_type_ids: torch.Tensor | None, validate: bool | None):
    """(base model, family, encode's EncoderResult on the packed layout, or None when there is no token)."""
    base, family = _base_and_family(model)
    views = _checked_views(base, family)
    _check_arguments(input_ids, cu_seqlens, token_type_ids)
    unread = family.unread(base) if family.unread is not None else frozenset()
    max_seqlen = check_cu_seqlens(cu_seqlens, input_ids.shape[0], _length_limit(base, family, unread))
    inputs = _encoder_inputs(base, family, unread, input_ids, cu_seqlens, token_type_ids)
    if should_validate(base.config, validate):
        validate_inputs(base.config, base.get_input_embeddings().weight.device, inputs["input_ids"], None,
                        inputs["token_type_ids"], inputs["position_ids"], length_limit=False)
    if input_ids.shape[0] == 0:
        return base, family, None
    layout = TokenLayout.from_cu_seqlens(cu_seqlens, max_seqlen, input_ids.shape[0])
    return base, family, encode(base, family, inputs, None, {}, views, layout=layout)


# ---- sequence classifiers on packed inputs ----------------------------------------------------------------


class PackedClassifierOutput(NamedTuple):
    logits: torch.Tensor  # (batch, num_labels) in the model's dtype, as the head's forward computes them
    first_tokens: torch.Tensor  # (batch, hidden): each sequence's first token's last hidden state ([CLS], <s>)
    pooler_output: torch.Tensor | None  # (batch, hidden) the base model's pooler on them, None without one


def classify_packed(model: nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, *,
                    token_type_ids: torch.Tensor | None = None,
                    validate: bool | None = None) -> PackedClassifierOutput:
    """A sequence classifier's logits for sequences packed back to back (encode_packed's arguments).

    Every head classify_packed knows reads each sequence's first token only ([:, 0] of the padded output,
    directly or through the base model's pooler), so it runs on (batch, hidden): the encoder's first tokens
    (and pooler output), then the head's own modules in the order its transformers forward calls them. Known:
    transformers' ForSequenceClassification of BERT and ALBERT (pooler, dropout, classifier), RoBERTa, XLM-R,
    CamemBERT, ELECTRA, MPNet (their ClassificationHead on [:, 0]), DistilBERT (pre_classifier, ReLU, dropout,
    classifier) and DeBERTa-v2/v3 (ContextPooler, dropout, classifier), as fastbert's native classes, patched
    or plain, whose forward and head module classes are exactly transformers'. Anything else is a ValueError
    (packed_head_problem says why beforehand): a caller keeps its padded path for it.
    """
    head = _known_head(model)
    if isinstance(head, str):
        raise ValueError(f"classify_packed: {head}")
    base, family, result = _encode_packed(model, input_ids, cu_seqlens, token_type_ids, validate)
    if result is None:  # no token: zeros for the (empty) sequences, as the padded path's first column holds
        width = base.config.hidden_size
        first = base.get_input_embeddings().weight.new_zeros(cu_seqlens.shape[0] - 1, width)
        pooled = family.pool(base, first) if head.pooler else None
    else:
        first = result.first_tokens
        pooled = (result.pooled if result.pooled is not None else family.pool(base, first)) if head.pooler else None
    return PackedClassifierOutput(head.logits(model, first, pooled), first, pooled)


def packed_head_problem(model: nn.Module) -> str | None:
    """Why classify_packed refuses `model` (the message it raises), or None when it runs it."""
    head = _known_head(model)
    if isinstance(head, str):
        return f"classify_packed: {head}"
    return packed_problem(model)


class _Head(NamedTuple):
    pooler: bool  # the logits read the base model's pooler output (else the first tokens)
    logits: Callable  # (head model, first tokens, pooler output) -> logits


def _pooler_linear(model, first, pooled):  # BERT, ALBERT: outputs[1] -> dropout -> classifier
    return model.classifier(model.dropout(pooled))


def _first_token_module(model, first, pooled):  # RoBERTa & co: a ClassificationHead reading features[:, 0, :]
    return model.classifier(first[:, None])


def _distilbert(model, first, pooled):  # hidden_state[:, 0] -> pre_classifier -> ReLU -> dropout -> classifier
    return model.classifier(model.dropout(nn.ReLU()(model.pre_classifier(first))))


def _context_pooler(model, first, pooled):  # DeBERTa-v2: ContextPooler reads hidden_states[:, 0]
    return model.classifier(model.dropout(model.pooler(first[:, None])))


def _head_table() -> dict:
    """transformers' ForSequenceClassification class -> (_Head, {attribute: the exact class it must have})."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import ContextPooler

    from fastbert.models.families import FAMILIES

    table = {}
    for family in FAMILIES:
        hf = family.hf_class("ForSequenceClassification")
        module = sys.modules[hf.__module__]
        if family.model_type in ("bert", "albert"):
            table[hf] = (_Head(True, _pooler_linear), {})
        elif family.model_type == "distilbert":
            table[hf] = (_Head(False, _distilbert), {})
        elif family.model_type == "deberta-v2":
            table[hf] = (_Head(False, _context_pooler), {"pooler": ContextPooler})
        else:
            table[hf] = (_Head(False, _first_token_module),
                         {"classifier": getattr(module, f"{family.class_prefix}ClassificationHead")})
    return table


_HEADS: dict | None = None


def _known_head(model: nn.Module) -> _Head | str:
    """The head classify_packed computes for `model`, or why it does not know it."""
    global _HEADS
    if _HEADS is None:
        _HEADS = _head_table()
    if not isinstance(model, nn.Module):
        return f"model must be a torch.nn.Module, got {type(model).__name__}"
    hf = next((cls for cls in type(model).__mro__ if cls in _HEADS), None)
    if hf is None:
        return f"{type(model).__name__} is not a sequence classifier it knows"
    if type(model).forward is not hf.forward:
        return f"{type(model).__name__} has its own forward (not transformers' {hf.__name__}.forward)"
    head, classes = _HEADS[hf]
    for name, cls in classes.items():
        if type(getattr(model, name, None)) is not cls:
            return (f"{type(model).__name__}.{name} is a {type(getattr(model, name, None)).__name__}, not "
                    f"transformers' {cls.__name__}")
    hooked = [name or type(model).__name__ for name, module in model.named_modules()
              if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        return f"forward hooks on {', '.join(hooked[:3])} (a packed forward would skip some)"
    if head.pooler and getattr(model.base_model, "pooler", None) is None:
        return f"{type(model).__name__}'s base model has no pooler"
    return head


def _check_arguments(input_ids, cu_seqlens, token_type_ids) -> None:
    _check_tensor("input_ids", input_ids, torch.long)
    _check_tensor("cu_seqlens", cu_seqlens, torch.int32)
    if cu_seqlens.device != input_ids.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids on {input_ids.device}: one device")
    if token_type_ids is not None:
        _check_tensor("token_type_ids", token_type_ids, torch.long)
        if token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(token_type_ids.shape)}")


def _encoder_inputs(base: nn.Module, family: Family, unread: frozenset, input_ids: torch.Tensor,
                    cu_seqlens: torch.Tensor, token_type_ids: torch.Tensor | None) -> dict:
    """encode's inputs as one (1, tokens) row each, positions numbered per sequence."""
    if token_type_ids is not None and not family.token_types:
        raise ValueError(f"token_type_ids: {family.name} has no token types")
    if "token_type_ids" in unread:  # DeBERTa-v3 (type_vocab_size 0) ignores them, as in transformers
        token_type_ids = None
    positions = None if "position_ids" in unread else packed_positions(family, base.embeddings, input_ids, cu_seqlens)
    return {"input_ids": input_ids[None], "inputs_embeds": None, "position_ids": _row(positions),
            "token_type_ids": _row(token_type_ids)}


def packed_problem(model: nn.Module) -> str | None:
    """Why encode_packed refuses `model` (the message it raises), or None when it runs it."""
    try:
        _checked_views(*_base_and_family(model))
    except (TypeError, ValueError) as why:  # UnsupportedModelError is a ValueError
        return str(why)
    return None


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """(tokens, hidden) packed by cu_seqlens -> (batch, hidden) float32: "mean" over each sequence's tokens
    (0 for an empty one), or "cls", its first token (0 for an empty one)."""
    if mode == "cls":
        return TokenLayout.from_cu_seqlens(cu_seqlens, 0, hidden.shape[0]).first_tokens(hidden).float()
    if mode != "mean":
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(POOLING_MODES)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sums = torch.segment_reduce(hidden.float(), "sum", lengths=lengths, axis=0)
    return sums / lengths.clamp(min=1)[:, None]


def packed_positions(family: Family, embeddings: nn.Module, input_ids: torch.Tensor,
                     cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(tokens,) each token's position id as the family's positions function gives it in its sequence alone."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=input_ids.shape[0])
    if family.positions is column_positions:  # the column's entry of the position_ids buffer
        columns = torch.arange(input_ids.shape[0], device=input_ids.device) - starts
        longest = int(lengths.max()) if lengths.numel() else 0
        return column_positions(embeddings, None, 1, longest)[0].index_select(0, columns)
    if family.positions is padding_offset_positions:
        # the count of non-pad tokens over the whole row, less what the earlier sequences counted
        row = padding_offset_positions(embeddings, input_ids[None], 1, input_ids.shape[0])[0]
        real = input_ids.ne(embeddings.padding_idx).long()
        before = (torch.cumsum(real, 0) - real).index_select(0, starts)
        return row - before * real
    raise ValueError(f"encode_packed does not know {family.name}'s positions ({family.positions.__name__})")


def check_cu_seqlens(cu_seqlens: torch.Tensor, tokens: int, limit: int | None) -> int:
    """The longest sequence of a valid cu_seqlens, else a ValueError naming the index, value and limit."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D (batch + 1,), got shape {tuple(cu_seqlens.shape)}")
    values = cu_seqlens.tolist()  # one host read: the layout needs the longest length anyway
    if values[0] != 0:
        raise ValueError(f"cu_seqlens[0] is {values[0]}; it must be 0")
    lengths = [b - a for a, b in zip(values, values[1:])]
    shortest = min(lengths, default=0)
    if shortest < 0:
        i = lengths.index(shortest)
        raise ValueError(f"cu_seqlens decreases at index {i + 1} ({values[i]} then {values[i + 1]}): "
                         "it must be non-decreasing")
    if values[-1] != tokens:
        raise ValueError(f"cu_seqlens[-1] is {values[-1]} but input_ids holds {tokens} tokens: they must be equal")
    longest = max(lengths, default=0)
    if limit is not None and longest > limit:
        i = lengths.index(longest)
        raise ValueError(f"sequence {i} (cu_seqlens[{i}]..cu_seqlens[{i + 1}]) has {longest} tokens but this model "
                         f"takes at most {limit} (max_position_embeddings less the first position): truncate it")
    return longest


def _length_limit(base: nn.Module, family: Family, unread: frozenset) -> int | None:
    if "position_ids" in unread:  # no absolute positions (DeBERTa-v3): no limit, as in transformers
        return None
    return base.config.max_position_embeddings - family.first_position(base.config)


def _check_tensor(name: str, value, dtype: torch.dtype) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if name != "cu_seqlens" and value.dim() != 1:
        raise ValueError(f"{name} must be 1-D (tokens,), the sequences back to back, got shape {tuple(value.shape)}")


def _row(values: torch.Tensor | None) -> torch.Tensor | None:
    """(tokens,) -> the (1, tokens) row the layout's inputs are (a view)."""
    return None if values is None else values[None]


def _base_and_family(model: nn.Module) -> tuple[nn.Module, Family]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = getattr(model, "base_model", model)  # a head's encoder; a base model is its own
    family = base._fastbert_family if isinstance(base, FastEncoder) else family_of_base(type(base))
    if family is not None:
        return base, family
    from fastbert.models.families import supported_names
    from fastbert.patch import UnsupportedModelError

    note = (" (ModernBERT unpads its own padded batch: call the model with an attention_mask)"
            if "ModernBert" in type(base).__name__ else "")
    raise UnsupportedModelError(f"encode_packed: {type(base).__name__} is not a base model of a family it runs"
                                f"{note}; it runs: {supported_names()}")


def _checked_views(base: nn.Module, family: Family) -> dict:
    """The module check's views, or a ValueError naming what the fast path does not run (there is no
    transformers forward on packed inputs to fall back to)."""
    check = check_modules(family, base, (family.layer, fast_layer_class(family)))
    known = _EMBED_KNOWN.get(family.embed, lambda e: family.embed is None and embeddings_known(family, e))
    reason = (
        ("a decoder (causal) model" if getattr(base.config, "is_decoder", False) else None)
        or check.problem or relative_problem(family, base, {})
        or (None if known(base.embeddings) else f"embeddings of class {type(base.embeddings).__name__}")
    )
    if reason is not None:
        raise ValueError(f"encode_packed: {reason} is not on the fast path, and packed inputs have no other")
    return check.views


def _empty(base: nn.Module, cu_seqlens: torch.Tensor, pooling: str | None) -> PackedOutput:
    """No token at all: nothing to run; empty sequences pool to zeros (as pool_packed does)."""
    weight = base.get_input_embeddings().weight
    width = base.config.hidden_size
    hidden = weight.new_zeros(0, width)
    pooled = None if pooling is None else torch.zeros(cu_seqlens.shape[0] - 1, width, device=weight.device)
    return PackedOutput(hidden, pooled)
