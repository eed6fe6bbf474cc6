"""Training with fastbert: the same loss and gradients as transformers, and learning with dropout."""
import torch
import transformers

import fastbert
from tests.helpers import max_error, random_batch, small_config


def twin(name, config):
    torch.manual_seed(0)
    reference = getattr(transformers, name)(config).train()
    fast = getattr(fastbert, name)(config).train()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(name, batch, config):
    reference, fast = twin(name, config)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(fast, batch)
    assert max_error(loss, ref_loss) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        scale = max(1.0, ref.abs().max().item())
        assert max_error(grads[key], ref) <= 1e-5 * scale, key


def test_mlm_training_step_matches_transformers_with_dropout_off():
    config = small_config()
    batch = random_batch(config, 3, 12, lengths=[12, 7, 3])
    labels = batch["input_ids"].masked_fill(torch.rand(3, 12) < 0.7, -100)
    labels[:, 0] = batch["input_ids"][:, 0]
    # Labels on padding are -100, as HF's data collators make them: fastbert computes no padding.
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    assert_same_training_step("BertForMaskedLM", dict(batch, labels=labels), config)


def test_classification_training_step_matches_transformers_with_dropout_off():
    config = small_config()
    batch = random_batch(config, 4, 10, lengths=[10, 2, 6, 9])
    assert_same_training_step("BertForSequenceClassification", dict(batch, labels=torch.tensor([0, 1, 1, 0])), config)


def test_pretraining_step_matches_transformers_with_dropout_off():
    config = small_config()
    batch = random_batch(config, 2, 9, lengths=[9, 4])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch = dict(batch, labels=labels, next_sentence_label=torch.tensor([0, 1]))
    assert_same_training_step("BertForPreTraining", batch, config)


def test_training_with_dropout_learns():
    """With dropout on, a classifier learns a token-presence rule well above chance."""
    config = small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        batch = random_batch(config, 16, 12, generator=g)
        labels = (batch["input_ids"] == 5).any(dim=1).long()
        batch["input_ids"][labels == 0] = batch["input_ids"][labels == 0].clamp(min=6)
        labels = (torch.rand(16, generator=g) < 0.5).long()
        batch["input_ids"][labels == 1, 0] = 5
        batch["input_ids"][labels == 0] = batch["input_ids"][labels == 0].clamp(min=6)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
