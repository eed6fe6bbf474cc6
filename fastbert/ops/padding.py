"""unpad_input / pad_input: move between padded (batch, seq, ...) and packed (total_tokens, ...) layouts.

The encoder unpads once after reading the mask and pads once at the end, so no layer ever computes
on padding. Sequences stay in batch order and tokens in position order, which is what cu_seqlens
(the int32 prefix sums of the sequence lengths) describes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_mask(attention_mask: torch.Tensor, hidden: torch.Tensor) -> None:
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"attention_mask must have shape (batch, seq) = {tuple(hidden.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Keep the tokens where attention_mask is nonzero.

    Returns (hidden_unpadded (total, ...), indices (total,) int64 into batch*seq,
    cu_seqlens (batch+1,) int32, max_seqlen int). One host sync: the token count and max_seqlen.
    """
    _check_mask(attention_mask, hidden)
    keep = attention_mask.bool()
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten()).flatten()
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden.reshape(-1, *hidden.shape[2:])
    return flat.index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad_input(hidden_unpadded: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: scatter tokens back into (batch, seqlen, ...), zeros at padding."""
    rest = hidden_unpadded.shape[1:]
    padded = hidden_unpadded.new_zeros(batch * seqlen, *rest)
    return padded.index_copy(0, indices, hidden_unpadded).view(batch, seqlen, *rest)
