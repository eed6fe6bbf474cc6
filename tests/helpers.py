"""Shared test helpers: the tolerance rule, small model configs, random batches."""
from __future__ import annotations

import torch
import transformers

# Smallest float differences each dtype is allowed beyond twice PyTorch's own error.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference.double()).abs().max().item() if value.numel() else 0.0


def assert_close_to_ref(fast: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor, atol=None, name=""):
    """err(fast, fp64 ref) <= 2 * err(torch in the same dtype, fp64 ref) + atol (flash-attention's rule)."""
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    atol = ATOL[fast.dtype] if atol is None else atol
    fast_err, torch_err = max_error(fast, ref64), max_error(torch_same_dtype, ref64)
    assert fast_err <= 2 * torch_err + atol, f"{name}: error {fast_err:.3g} > 2 * {torch_err:.3g} + {atol:g}"


def small_config(**overrides) -> transformers.BertConfig:
    """A tiny BERT (2 layers, hidden 64, 4 heads of 16) for fast CPU tests."""
    values = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    values.update(overrides)
    return transformers.BertConfig(**values)


def padding_mask(lengths, seqlen: int, side: str = "right") -> torch.Tensor:
    """(batch, seqlen) int mask with the given real lengths, padded on `side`."""
    positions = torch.arange(seqlen)[None, :]
    lengths = torch.as_tensor(lengths)[:, None]
    keep = positions < lengths if side == "right" else positions >= seqlen - lengths
    return keep.long()


def random_batch(config, batch: int, seqlen: int, lengths=None, side="right", generator=None):
    """input_ids, token_type_ids and attention_mask for a random batch."""
    input_ids = torch.randint(0, config.vocab_size, (batch, seqlen), generator=generator)
    token_type_ids = torch.randint(0, config.type_vocab_size, (batch, seqlen), generator=generator)
    if lengths is None:
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=generator)
    mask = padding_mask(lengths, seqlen, side)
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=mask)
