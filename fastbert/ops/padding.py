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


def counts_from_mask(keep: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(lengths (batch,) int32, max_seqlen, total_tokens) of a (batch, seq) bool mask: one host sync."""
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    if lengths.numel() == 0:
        return lengths, 0, 0
    max_seqlen, total = torch.stack([lengths.max(), lengths.sum()]).tolist()
    return lengths, max_seqlen, total


def has_holes(keep: torch.Tensor | None) -> bool:
    """Whether some row of a (batch, seq) keep-mask has padding between its tokens (one host sync). Packing
    keeps the distances between tokens only when each row's tokens are one contiguous run (left or right padding)."""
    if keep is None or keep.shape[1] < 2:
        return False
    starts = (keep[:, 1:] & ~keep[:, :-1]).sum(dim=1) + keep[:, 0]
    return bool((starts > 1).any())


def packing_from_counts(keep: torch.Tensor, lengths: torch.Tensor, total: int):
    """(indices, cu_seqlens) for a mask whose counts_from_mask are known: nonzero_static needs no sync."""
    indices = torch.nonzero_static(keep.flatten(), size=total).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens


def packing_from_mask(keep: torch.Tensor):
    """(indices, cu_seqlens, max_seqlen, total_tokens) for a (batch, seq) bool mask.

    One host sync reads max_seqlen and the token count together; nonzero_static then needs none.
    """
    lengths, max_seqlen, total = counts_from_mask(keep)
    indices, cu_seqlens = packing_from_counts(keep, lengths, total)
    return indices, cu_seqlens, max_seqlen, total


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Keep the tokens where attention_mask is nonzero.

    Returns (hidden_unpadded (total, ...), indices (total,) int64 into batch*seq,
    cu_seqlens (batch+1,) int32, max_seqlen int).
    """
    _check_mask(attention_mask, hidden)
    indices, cu_seqlens, max_seqlen, _ = packing_from_mask(attention_mask.bool())
    return gather_rows(hidden, indices), indices, cu_seqlens, max_seqlen


def gather_rows(padded: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(batch, seq, ...) -> (len(indices), ...): the rows of batch*seq that `indices` names."""
    return padded.reshape(-1, *padded.shape[2:]).index_select(0, indices)


def pad_input(hidden_unpadded: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad_input: scatter tokens back into (batch, seqlen, ...), zeros at padding."""
    rest = hidden_unpadded.shape[1:]
    padded = hidden_unpadded.new_zeros(batch * seqlen, *rest)
    return padded.index_copy(0, indices, hidden_unpadded).view(batch, seqlen, *rest)
