"""Layer programs: the order of one encoder layer's steps, written once per layer kind.

A program is run by one of two executors, which give the steps their meaning:

- bound (fastbert/models/plan_steps.py `LayerSteps`): every step bound once by the inference plan to the
  registry's choice for the model's device and dtype (packed weights, fused query/key/value, biases placed);
  `call` is the forward's `BoundCall` (the attention kernel and its shape arguments).
- live (fastbert/models/encoder.py `LiveLayer`, fastbert/models/modernbert.py `LiveModernLayer`): every step
  resolved per call from the layer's modules, so training, dropout, hooks, PEFT wrappers, FSDP and
  torch.compile see what they expect; `call` is the forward's TokenLayout.

Both executors of a kind bind the same kernels through the same registry, so an fp32 inference forward is
bitwise the same on either (tests/models/test_plan.py). A new layer kind is one program here plus its
executors' steps.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class PostNormSteps(Protocol):
    """The steps of a post-LayerNorm layer (the BERT family table)."""

    def attention(self, hidden: torch.Tensor, call) -> torch.Tensor: ...  # hidden -> context
    def attention_out(self, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor: ...  # LN(dense + res)
    def ffn_in(self, hidden: torch.Tensor) -> torch.Tensor: ...  # activation(dense(hidden))
    def ffn_out(self, inner: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor: ...  # LN(dense + res)


def post_norm(steps: PostNormSteps, hidden: torch.Tensor, call) -> torch.Tensor:
    """BERT, RoBERTa, ..., MPNet, DeBERTa: each block's residual add is followed by a LayerNorm."""
    hidden = steps.attention_out(steps.attention(hidden, call), hidden)
    return steps.ffn_out(steps.ffn_in(hidden), hidden)


class PreNormSteps(Protocol):
    """The steps of a pre-LayerNorm layer (ModernBERT)."""

    def attention_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def attention(self, hidden: torch.Tensor, call) -> torch.Tensor: ...  # normed hidden -> context
    def attention_out(self, context: torch.Tensor) -> torch.Tensor: ...  # the output projection
    def ffn_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def ffn_in(self, hidden: torch.Tensor) -> torch.Tensor: ...  # the gated activation of the input projection
    def ffn_out(self, inner: torch.Tensor) -> torch.Tensor: ...  # the output projection


def pre_norm(steps: PreNormSteps, hidden: torch.Tensor, call) -> torch.Tensor:
    """ModernBERT: a LayerNorm before each block, a plain residual add after it."""
    hidden = hidden + steps.attention_out(steps.attention(steps.attention_norm(hidden), call))
    return hidden + steps.ffn_out(steps.ffn_in(steps.ffn_norm(hidden)))


class BoundCall(NamedTuple):
    """What a bound layer's attention needs from the forward: the plan's attention for this layout (dense or
    packed) and its shape arguments ((batch, seqlen) or (cu_seqlens, max_seqlen))."""

    attend: object
    shape: tuple
