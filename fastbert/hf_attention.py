"""attn_implementation="fastbert": fastbert's attention inside any HuggingFace model.

Importing fastbert registers two functions under the name "fastbert":
- an attention function with transformers' AttentionInterface, which every model written against it
  (BERT, RoBERTa, ...) calls as f(module, query, key, value, attention_mask, scaling=, dropout=, ...)
  with q/k/v of shape (batch, heads, seq, head_dim), expecting (output (batch, seq, heads, head_dim), None);
- a mask function with transformers.masking_utils.AttentionMaskInterface. Without it transformers
  treats the name as a backend that needs no mask and silently drops the padding mask.

For plain self-attention with a padding mask, the mask function hands over a (batch, 1, 1, seq) bool
key-padding mask (a view of the 2-D mask, nothing materialized at seq x seq) and the attention function
runs fastbert.ops.attention. Everything else (causal or cross attention, KV caches, grouped-query heads,
float or per-query masks, position biases) is passed to transformers' own SDPA functions unchanged, so
the name is safe to use with any model: never silently wrong, just not faster there.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, sdpa_mask

from fastbert.ops import attention

NAME = "fastbert"

# kwargs that change the attention math beyond (q, k, v, key-padding mask, scale, dropout).
_SDPA_ONLY_KWARGS = ("position_bias", "softcap", "sliding_window", "s_aux", "cache")


def fastbert_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=bidirectional_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The mask that fastbert_attention_forward reads.

    Bidirectional self-attention (the encoder case): None without a mask, else the 2-D padding mask as
    a (batch, 1, 1, kv_length) bool view. Any other pattern: sdpa_mask's (batch, 1, q, kv) bool mask
    (or None when is_causal can stand in for it), which the attention function hands to SDPA.
    """
    simple = (
        mask_function is bidirectional_mask_function
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == 0
        and kv_offset == 0
    )
    if simple and attention_mask is None:
        return None
    if simple and attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length:
        return attention_mask.to(torch.bool)[:, None, None, :]
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def _key_padding_mask(attention_mask: torch.Tensor | None, batch: int, seqlen: int):
    """(batch, seq) bool from a (batch, 1, 1, seq) bool mask; None for no mask; False if not that kind."""
    if attention_mask is None:
        return None
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and attention_mask.shape[2] == 1
        and attention_mask.shape[0] == batch
        and attention_mask.shape[3] == seqlen
    ):
        return attention_mask[:, 0, 0, :]
    return False


def fastbert_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """HF attention function: fastbert.ops.attention for padded self-attention, SDPA for the rest."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)  # transformers' SDPA default
    batch, _, q_length, _ = query.shape
    keep = _key_padding_mask(attention_mask, batch, key.shape[2])
    fast = (
        keep is not False
        and not (is_causal and attention_mask is None and q_length > 1)
        and query.shape == key.shape == value.shape
        and query.dtype == key.dtype == value.dtype
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in _SDPA_ONLY_KWARGS)
    )
    if not fast:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = attention(query, key, value, keep, softmax_scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "fastbert" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, fastbert_attention_forward)
    AttentionMaskInterface.register(NAME, fastbert_attention_mask)


register()
