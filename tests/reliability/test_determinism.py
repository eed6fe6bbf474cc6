"""Determinism: with torch.use_deterministic_algorithms(True), repeated forward and backward runs
from the same seed are bitwise identical on every available CPU backend (dropout on)."""
from __future__ import annotations

import pytest
import torch

import fastbert
from tests.helpers import random_batch, small_config


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _run(cls, dtype, batch, seed=0):
    """Build, run forward + backward in training mode (dropout 0.1), return outputs and gradients."""
    config = small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).train()
    torch.manual_seed(seed + 1)  # the dropout masks
    out = model(**batch)
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loss = out.loss if getattr(out, "loss", None) is not None else value.float().square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return value.detach().clone(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM"])
def test_forward_and_backward_are_bitwise_repeatable(deterministic, cpu_training_backend, dtype, cls_name):
    cls = getattr(fastbert, cls_name)
    batch = random_batch(small_config(), 3, 12, lengths=[12, 5, 1], generator=torch.Generator().manual_seed(3))
    if cls_name == "BertForMaskedLM":
        batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    first_out, first_grads = _run(cls, dtype, batch)
    for _ in range(2):
        out, grads = _run(cls, dtype, batch)
        assert torch.equal(out, first_out)
        assert grads.keys() == first_grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            assert torch.equal(grad, first_grads[name]), name


def test_inference_is_bitwise_repeatable_across_batch_layouts(deterministic, cpu_backend):
    """The same batch run twice through one model in eval mode (padded and unpadded layouts)."""
    torch.manual_seed(0)
    model = fastbert.BertModel(small_config()).eval()
    g = torch.Generator().manual_seed(4)
    for lengths in ([12, 12, 12], [12, 5, 1], [0, 7, 3]):
        batch = random_batch(small_config(), 3, 12, lengths=lengths, generator=g)
        with torch.no_grad():
            a, b = model(**batch), model(**batch)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        assert torch.equal(a.pooler_output, b.pooler_output)
