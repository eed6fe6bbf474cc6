"""Benchmark inputs: sequence-length distributions, padded batches, and the work they contain.

Length distributions (`--lengths`), for a batch of `batch` sequences capped at `seq` tokens:
  full       every sequence has `seq` tokens (no padding)
  uniform    one sequence has `seq` tokens, the others uniform in [max(1, seq // 8), seq]
  lognormal  one sequence has `seq` tokens, the others round(exp(N(log(seq / 4), 0.75))) clipped
             to [1, seq]: right-skewed, median seq / 4, like sentence lengths in real corpora
  FILE       a text file with one token count per line; lengths are drawn from it with
             replacement and truncated to `seq`
Every batch is padded to its longest sequence (a tokenizer's padding="longest"): for full, uniform
and lognormal that is exactly `seq` wide, for FILE it can be narrower.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_DISTRIBUTIONS = ("full", "uniform", "lognormal")
MLM_PROBABILITY = 0.15


class WorkloadError(ValueError):
    """A length distribution or lengths file that cannot be used."""


def read_lengths_file(path: str | Path) -> torch.Tensor:
    """The positive integers of a file with one token count per line (blank lines and # comments skipped)."""
    values = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise WorkloadError(f"{path}:{number}: expected a token count, got {text!r}") from None
        if value < 1:
            raise WorkloadError(f"{path}:{number}: token counts must be >= 1, got {value}")
        values.append(value)
    if not values:
        raise WorkloadError(f"{path}: no token counts found")
    return torch.tensor(values, dtype=torch.long)


def sample_lengths(kind: str, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """(batch,) int64 sequence lengths in [1, seq] drawn from distribution `kind` (see module doc)."""
    if kind == "full":
        return torch.full((batch,), seq, dtype=torch.long)
    if kind == "uniform":
        lengths = torch.randint(max(1, seq // 8), seq + 1, (batch,), generator=generator)
    elif kind == "lognormal":
        normal = torch.randn(batch, generator=generator, dtype=torch.float64)
        lengths = torch.exp(math.log(seq / 4) + 0.75 * normal).round().long().clamp(1, seq)
    else:
        pool = read_lengths_file(kind)
        picks = torch.randint(0, pool.numel(), (batch,), generator=generator)
        return pool[picks].clamp(max=seq)
    lengths[0] = seq
    return lengths


@dataclass
class Workload:
    """One padded batch: the tensors every implementation receives, and its size in real tokens."""

    batch: int
    seq: int  # the cap asked for
    lengths: torch.Tensor  # (batch,) int64, on CPU
    inputs: dict  # input_ids, attention_mask, token_type_ids: (batch, width) on the device
    labels: torch.Tensor  # (batch, width) MLM labels, -100 where no prediction is made

    @property
    def width(self) -> int:
        return self.inputs["input_ids"].shape[1]

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / (self.batch * self.width)

    @property
    def keep(self) -> torch.Tensor:
        return self.inputs["attention_mask"].bool()


def make_workload(
    config, batch: int, seq: int, kind: str, device: torch.device, seed: int
) -> Workload:
    """A seeded random batch of `batch` sequences with lengths from `kind`, capped at `seq` tokens."""
    if seq > config.max_position_embeddings:
        raise WorkloadError(f"seq {seq} exceeds the model's max_position_embeddings {config.max_position_embeddings}")
    generator = torch.Generator().manual_seed(seed)
    lengths = sample_lengths(kind, batch, seq, generator)
    width = int(lengths.max())
    keep = torch.arange(width)[None, :] < lengths[:, None]
    pad = config.pad_token_id or 0
    input_ids = torch.randint(pad + 1, config.vocab_size, (batch, width), generator=generator).masked_fill(~keep, pad)
    chosen = (torch.rand(batch, width, generator=generator) < MLM_PROBABILITY) & keep
    chosen[0, 0] = True  # at least one prediction, so the loss is defined
    labels = input_ids.masked_fill(~chosen, -100)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": keep.long().to(device)}
    if getattr(config, "type_vocab_size", 0):  # DistilBERT has no token types
        inputs["token_type_ids"] = torch.zeros(batch, width, dtype=torch.long, device=device)
    return Workload(batch, seq, lengths, inputs, labels.to(device))


def forward_flops(config, lengths: torch.Tensor, with_mlm_head: bool) -> float:
    """Useful forward FLOPs on the real tokens only (padding earns nothing).

    Per layer and token: 2 * (4 h^2 + 2 h i) for the QKV, output and feed-forward GEMMs; per layer and
    sequence of length L: 4 L^2 h for QK^T and PV. The MLM head adds 2 (h^2 + h V) per token.
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = float(lengths.sum())
    squares = float((lengths.double() ** 2).sum())
    flops = layers * (tokens * 2 * (4 * h * h + 2 * h * i) + squares * 4 * h)
    if with_mlm_head:
        flops += tokens * 2 * (h * h + h * config.vocab_size)
    return flops


def forward_bytes(config, lengths: torch.Tensor, parameter_bytes: int, element_size: int) -> float:
    """Minimal memory traffic of a forward on the real tokens: every weight read once, and per layer
    and token the main activations written once and read once ((14 h + 2 i) elements)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = float(lengths.sum())
    return parameter_bytes + layers * tokens * (14 * h + 2 * i) * element_size
