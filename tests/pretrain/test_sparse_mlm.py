"""The sparse MLM head (labelled rows only) against the dense head: same loss, same gradients."""
from __future__ import annotations

import pytest
import torch
import transformers

import fastbert
from tests.helpers import assert_close_to_ref, max_error, random_batch, small_config

HEADS = [fastbert.BertForPreTraining, fastbert.BertForMaskedLM]


def mlm_batch(config, generator=None):
    """A padded random batch with about 15% of the real tokens labelled, and NSP labels."""
    batch = random_batch(config, 6, 20, lengths=[20, 13, 7, 20, 3, 16], generator=generator)
    chosen = (torch.rand(batch["input_ids"].shape, generator=generator) < 0.15) & batch["attention_mask"].bool()
    chosen[0, 1] = True  # at least one label
    batch["labels"] = torch.where(chosen, batch["input_ids"], -100)
    return batch


def loss_and_grads(model, batch, sparse: bool):
    model.zero_grad()
    model.sparse_mlm_head = sparse
    inputs = dict(batch)
    if isinstance(model, transformers.BertForPreTraining):
        inputs["next_sentence_label"] = torch.tensor([0, 1, 1, 0, 1, 0])
    output = model(**inputs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", HEADS, ids=lambda c: c.__name__)
def test_sparse_loss_and_every_gradient_equal_the_dense_head(head):
    config = small_config()
    model = head(config)
    batch = mlm_batch(config)
    exact = head(config).double()
    exact.load_state_dict(model.state_dict())
    dense64, grads64 = loss_and_grads(exact, batch, sparse=False)
    sparse64, sparse_grads64 = loss_and_grads(exact, batch, sparse=True)
    dense32, grads32 = loss_and_grads(model, batch, sparse=False)
    sparse32, sparse_grads32 = loss_and_grads(model, batch, sparse=True)
    # in float64 the two heads are the same function: equal to rounding
    assert max_error(sparse64.loss, dense64.loss) <= 1e-12
    assert set(sparse_grads64) == set(grads64) and len(grads64) == len(list(model.parameters()))
    for name in grads64:
        assert max_error(sparse_grads64[name], grads64[name]) <= 1e-12, name
    # in float32 the sparse head is as close to the float64 dense head as the float32 dense head is
    assert_close_to_ref(sparse32.loss, dense32.loss, dense64.loss, name="loss")
    for name in grads64:
        assert_close_to_ref(sparse_grads32[name], grads32[name], grads64[name], name=f"grad of {name}")


@pytest.mark.parametrize("head", HEADS, ids=lambda c: c.__name__)
def test_sparse_head_computes_labelled_rows_only(head):
    config = small_config()
    model = head(config).eval()
    batch = mlm_batch(config)
    seen = []
    model.cls.predictions.decoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    dense, _ = loss_and_grads(model, batch, sparse=False)
    sparse, _ = loss_and_grads(model, batch, sparse=True)
    labelled = int((batch["labels"] != -100).sum())
    assert seen == [(6, 20, config.hidden_size), (labelled, config.hidden_size)]
    selected = batch["labels"] != -100
    assert max_error(mlm_logits(sparse), mlm_logits(dense)[selected]) <= 1e-5
    dense_mlm_loss = torch.nn.functional.cross_entropy(mlm_logits(dense)[selected], batch["labels"][selected])
    assert max_error(sparse.mlm_loss, dense_mlm_loss) <= 1e-6


def mlm_logits(output) -> torch.Tensor:
    return output.prediction_logits if hasattr(output, "prediction_logits") else output.logits


def test_without_the_flag_outputs_are_transformers():
    config = small_config()
    model = fastbert.BertForMaskedLM(config).eval()
    reference = transformers.BertForMaskedLM(config).eval()
    reference.load_state_dict(model.state_dict())
    batch = mlm_batch(config)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = model(**batch), reference(**batch)
    assert type(ours) is type(theirs) and ours.logits.shape == theirs.logits.shape == (6, 20, config.vocab_size)
    assert max_error(ours.logits[keep], theirs.logits[keep]) <= 1e-5
    assert max_error(ours.loss, theirs.loss) <= 1e-5


def test_sparse_flag_is_not_saved(tmp_path):
    model = fastbert.BertForPreTraining(small_config())
    model.sparse_mlm_head = True
    model.save_pretrained(tmp_path)
    assert "sparse_mlm_head" not in (tmp_path / "config.json").read_text()
    assert fastbert.BertForPreTraining.from_pretrained(tmp_path).sparse_mlm_head is False
