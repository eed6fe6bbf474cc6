"""Sparse MLM head: the MLM transform and decoder only at labelled positions (MosaicBERT, DeepSpeed BERT).

In pretraining about 15% of tokens carry an MLM label; the rest are -100. The dense head computes the
hidden->hidden transform, the LayerNorm and the hidden->vocabulary decoder (the largest GEMM of a
small BERT) at every position, and the loss then ignores 85% of the logits. The sparse head gathers
the labelled rows first: the loss and every gradient are the same (the ignored rows contribute
nothing to either), the work in the head falls about 6x.

Opt in per model: `model.sparse_mlm_head = True` (a plain attribute, never saved in the config).
It changes the outputs only when `labels` are given: `logits` / `prediction_logits` then hold one
row per labelled position, (num_labelled, vocab_size), in the row-major order of `labels != -100`,
and the output also carries `mlm_loss` (and `nsp_loss` for BertForPreTraining). Without the flag, or
without labels, the forward is transformers' own.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

IGNORE_INDEX = -100


@dataclass
class SparseMaskedLMOutput(MaskedLMOutput):
    mlm_loss: torch.Tensor | None = None


@dataclass
class SparsePreTrainingOutput(BertForPreTrainingOutput):
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


class SparseMLMHeadMixin:
    """For BertForMaskedLM / BertForPreTraining: `sparse_mlm_head = True` computes the head at labelled rows only."""

    sparse_mlm_head = False
    # These heads average their loss over the micro-batch and ignore num_items_in_batch: tell Trainer, so
    # that it scales for gradient accumulation itself instead of assuming the model did.
    accepts_loss_kwargs = False

    def forward(self, *args, **kwargs):
        if not self.sparse_mlm_head:
            return super().forward(*args, **kwargs)
        arguments = inspect.signature(super().forward).bind(*args, **kwargs).arguments
        extra = arguments.pop("kwargs", {})
        if arguments.get("labels") is None:
            return super().forward(*args, **kwargs)
        return self._sparse_forward(arguments, extra)

    def _sparse_forward(self, arguments: dict, extra: dict):
        labels = arguments.pop("labels")
        next_sentence_label = arguments.pop("next_sentence_label", None)
        return_dict = extra.pop("return_dict", None)
        encoded = self.bert(**arguments, **extra, return_dict=True)
        selected = labels != IGNORE_INDEX
        logits = self.cls.predictions(encoded.last_hidden_state[selected])
        mlm_loss = F.cross_entropy(logits, labels[selected])
        if hasattr(self.cls, "seq_relationship"):  # BertForPreTraining
            output = self._pretraining_output(encoded, logits, mlm_loss, next_sentence_label)
        else:
            output = SparseMaskedLMOutput(
                loss=mlm_loss, logits=logits, hidden_states=encoded.hidden_states,
                attentions=encoded.attentions, mlm_loss=mlm_loss,
            )
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    def _pretraining_output(self, encoded, logits, mlm_loss, next_sentence_label) -> SparsePreTrainingOutput:
        nsp_logits = self.cls.seq_relationship(encoded.pooler_output)
        nsp_loss = total = None
        if next_sentence_label is not None:  # transformers returns a loss only when both labels are given
            nsp_loss = F.cross_entropy(nsp_logits.view(-1, 2), next_sentence_label.view(-1))
            total = mlm_loss + nsp_loss
        return SparsePreTrainingOutput(
            loss=total, prediction_logits=logits, seq_relationship_logits=nsp_logits,
            hidden_states=encoded.hidden_states, attentions=encoded.attentions, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
        )
