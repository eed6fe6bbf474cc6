"""fastbert.models.packed.classify_packed: a sequence classifier's head on each sequence's first token of the packed
encoder output, against the same model's padded forward (1e-5 in fp32) and transformers'; heads it does not
know are refused with the reason (the server keeps its padded path for them)."""
from __future__ import annotations

import pytest
import torch
import transformers

from fastbert.models.families import family_of_model_type
from fastbert.models.packed import classify_packed, packed_head_problem
from tests.helpers import max_error
from tests.models.family_configs import family_batch, family_config, hf_and_fast
from tests.models.test_packed import fresh_lengths, packed_inputs

TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "mpnet", "deberta-v2")
TOLERANCE = 1e-5


def _classifier(model_type: str, patched: bool = False, **overrides):
    config = family_config(model_type, num_labels=3, **overrides)
    name = f"{family_of_model_type(model_type).class_prefix}ForSequenceClassification"
    return config, *hf_and_fast(name, config, patched=patched)


def _packed_logits(model, batch: dict) -> torch.Tensor:
    packed = packed_inputs(batch)
    with torch.no_grad():
        return classify_packed(model, packed["input_ids"], packed["cu_seqlens"],
                               token_type_ids=packed["token_type_ids"]).logits


@pytest.mark.parametrize("patched", [False, True], ids=["native", "patched"])
@pytest.mark.parametrize("model_type", TYPES)
def test_packed_logits_equal_the_padded_forwards(model_type, patched):
    config, reference, model = _classifier(model_type, patched)
    torch.manual_seed(torch.seed() % 1000)
    batch = family_batch(config, fresh_lengths(20, 6), 20)
    assert packed_head_problem(model) is None
    logits = _packed_logits(model, batch)
    with torch.no_grad():
        padded, expected = model(**batch).logits, reference(**batch).logits
    assert logits.shape == (6, 3) and logits.dtype == torch.float32
    assert max_error(logits, padded) <= TOLERANCE
    assert max_error(logits, expected) <= TOLERANCE


def test_a_plain_transformers_classifier_runs_too():
    config, reference, _ = _classifier("bert")
    batch = family_batch(config, [9, 4, 1], 9)
    with torch.no_grad():
        assert max_error(_packed_logits(reference, batch), reference(**batch).logits) <= TOLERANCE


def test_first_tokens_and_pooler_output_are_returned():
    config, _, model = _classifier("bert")
    batch = family_batch(config, [7, 3], 7)
    packed = packed_inputs(batch)
    with torch.no_grad():
        out = classify_packed(model, packed["input_ids"], packed["cu_seqlens"], token_type_ids=packed["token_type_ids"])
        padded = model.bert(**batch)
    assert torch.equal(out.first_tokens, padded.last_hidden_state[:, 0])
    assert max_error(out.pooler_output, padded.pooler_output) <= 1e-6


class OwnForward(transformers.BertForSequenceClassification):
    def forward(self, **kwargs):  # reads the mean of the tokens, not [CLS]
        return super().forward(**kwargs)


class MeanHead(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, features, **kwargs):
        return self.inner(features.mean(1, keepdim=True))


def test_heads_it_does_not_know_are_refused_with_the_reason():
    config = family_config("bert", num_labels=3)
    assert "has its own forward" in packed_head_problem(OwnForward(config).eval())
    _, _, roberta = _classifier("roberta")
    roberta.classifier = MeanHead(roberta.classifier)
    assert "classifier is a MeanHead, not transformers' RobertaClassificationHead" in packed_head_problem(roberta)
    with pytest.raises(ValueError, match="classify_packed: .*MeanHead"):
        classify_packed(roberta, torch.ones(3, dtype=torch.long), torch.tensor([0, 3], dtype=torch.int32))
    _, _, bert = _classifier("bert")
    bert.classifier.register_forward_hook(lambda *args: None)
    assert "forward hooks on classifier" in packed_head_problem(bert)
    _, _, no_pooler = _classifier("bert")
    no_pooler.bert.pooler = None
    assert "has no pooler" in packed_head_problem(no_pooler)
    assert "not a sequence classifier" in packed_head_problem(hf_and_fast("BertModel", family_config("bert"))[1])
    assert "not a sequence classifier" in packed_head_problem(
        hf_and_fast("BertForTokenClassification", family_config("bert"))[1])


def test_no_tokens_gives_the_heads_answer_on_zeros():
    _, _, model = _classifier("distilbert")
    with torch.no_grad():
        out = classify_packed(model, torch.zeros(0, dtype=torch.long), torch.tensor([0, 0], dtype=torch.int32))
        expected = model.classifier(torch.relu(model.pre_classifier(torch.zeros(1, 32))))
    assert out.logits.shape == (1, 3) and torch.equal(out.logits, expected)
