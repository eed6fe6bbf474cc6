"""Weights move both ways between fastbert and transformers; a new head is initialized as transformers does;
checkpoints with incomplete encoders (or damaged heads) are refused."""
import pytest
import torch
import transformers

import fastbert
from tests.helpers import max_error, random_batch, small_config


def test_transformers_checkpoint_loads_into_fastbert_and_back(tmp_path):
    config = small_config()
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    fast = fastbert.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    fast.save_pretrained(tmp_path / "fast")
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "fast").eval()
    assert fast.state_dict().keys() == reference.state_dict().keys()
    batch = random_batch(config, 2, 8, lengths=[8, 5])
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**batch).logits
        assert max_error(fast(**batch).logits[keep], expected[keep]) <= 1e-5
        assert torch.equal(back(**batch).logits, expected)


def test_headless_model_drops_head_weights_quietly(tmp_path):
    config = small_config()
    pretraining = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # weights no initialization draws: only the file can give them
        for parameter in pretraining.parameters():
            parameter.add_(torch.randn_like(parameter))
    pretraining.save_pretrained(tmp_path)
    model = fastbert.BertModel.from_pretrained(tmp_path).eval()
    assert isinstance(model, transformers.BertModel)
    expected = pretraining.bert.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} is not the checkpoint's"
    batch = random_batch(config, 2, 8, lengths=[8, 5])
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        got, want = model(**batch).last_hidden_state[keep], pretraining.bert(**batch).last_hidden_state[keep]
    assert max_error(got, want) <= 1e-5 * max(1.0, want.abs().max().item())


def test_missing_head_is_initialized_as_transformers_does(tmp_path):
    config = small_config()
    transformers.BertModel(config).save_pretrained(tmp_path)
    for flag in ({}, {"init_new_head": True}):  # init_new_head is still accepted
        model = fastbert.BertForSequenceClassification.from_pretrained(tmp_path, **flag)
        assert model.classifier.weight.shape == (config.num_labels, config.hidden_size)


def test_a_head_missing_some_of_its_weights_raises(tmp_path):
    config = small_config()
    model = transformers.BertForMaskedLM(config)
    state = {k: v for k, v in model.state_dict().items() if k != "cls.predictions.transform.dense.bias"}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(fastbert.MissingWeightsError, match=r"missing \(1\): cls.predictions.transform.dense.bias"):
        fastbert.BertForMaskedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("flag", [{}, {"init_new_head": True}])
def test_missing_encoder_weights_raise_even_for_a_new_head(tmp_path, flag):
    config = small_config()
    model = transformers.BertModel(config)
    state = {k: v for k, v in model.state_dict().items() if "layer.1.output.dense" not in k}
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(fastbert.MissingWeightsError, match="encoder.layer.1.output.dense.weight"):
        fastbert.BertForSequenceClassification.from_pretrained(tmp_path, **flag)


def test_trust_remote_code_is_refused(tmp_path):
    transformers.BertModel(small_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="never runs code from a checkpoint"):
        fastbert.BertModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_head_of_another_shape_raises_unless_ignore_mismatched_sizes(tmp_path):
    config = small_config(num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    expected = r"ignore_mismatched_sizes=True.*wrong shape \(2\): classifier.bias \(2,\) in the checkpoint, \(5,\) in"
    with pytest.raises(fastbert.MissingWeightsError, match=expected):
        fastbert.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    for flag in ("ignore_mismatched_sizes", "init_new_head"):
        model = fastbert.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5, **{flag: True})
        assert model.classifier.weight.shape == (5, config.hidden_size)
