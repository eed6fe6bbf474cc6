"""fastbert.patch / unpatch on HuggingFace BERT models: same objects, same outputs, reversible."""
import copy
import warnings

import pytest
import torch
import transformers
from transformers.models.bert import modeling_bert as hf

import fastbert
import fastbert.models.native as fast_bert
from fastbert.patch import is_patched
from tests.dropin._common import (
    assert_grads_close,
    count_calls,
    hf_pair,
    loss_and_grads,
    real_tokens,
)
from tests.helpers import max_error, multiple_choice_batch, random_batch, small_config

HEADS = [
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForNextSentencePrediction",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
]


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts the calls of the fast encoder (the patched forward's fast path)."""
    return count_calls(monkeypatch, fast_bert, "encode")


def tensors_of(output) -> dict:
    fields = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            fields[key] = value
        elif isinstance(value, tuple):
            fields.update({f"{key}.{i}": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
    return fields


def assert_outputs_close(out, ref, mask, atol=1e-5):
    out, ref = tensors_of(out), tensors_of(ref)
    assert out.keys() == ref.keys()
    for key, value in ref.items():
        got = out[key]
        assert got.shape == value.shape, key
        if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape):
            got, value = real_tokens(got, mask), real_tokens(value, mask)
        assert max_error(got, value) <= atol, f"{key}: {max_error(got, value):.3g}"


@pytest.mark.parametrize("name", HEADS)
def test_patched_head_matches_and_unpatch_restores_bitwise(name, encode_calls):
    config = small_config()
    model, reference = hf_pair(name, config)
    batch = random_batch(config, 3, 12, lengths=[12, 5, 1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        never_patched = reference(**batch, output_hidden_states=True)
        assert fastbert.patch(model) is model
        inner = model if name == "BertModel" else model.bert
        assert type(inner) is fastbert.BertModel and is_patched(model)
        patched = model(**batch, output_hidden_states=True)
        assert len(encode_calls) == 1
        assert_outputs_close(patched, never_patched, batch["attention_mask"])
        assert fastbert.unpatch(model) is model
        assert type(inner) is hf.BertModel and not is_patched(model)
        unpatched = model(**batch, output_hidden_states=True)
    assert len(encode_calls) == 1
    for key, value in tensors_of(never_patched).items():
        assert torch.equal(tensors_of(unpatched)[key], value), key
    assert not any("_fastbert_qkv_cache" in m.__dict__ for m in model.modules())


def test_multiple_choice_patched():
    config = small_config()
    model, reference = hf_pair("BertForMultipleChoice", config)
    batch, labels = multiple_choice_batch(config)
    fastbert.patch(model)
    with torch.no_grad():
        out, ref = model(**batch, labels=labels), reference(**batch, labels=labels)
    assert max_error(out.logits, ref.logits) <= 1e-5 and max_error(out.loss, ref.loss) <= 1e-5


def test_parameters_state_dict_and_optimizer_are_untouched():
    config = small_config()
    model, reference = hf_pair("BertForSequenceClassification", config, train=True)
    model.bert.embeddings.requires_grad_(False)  # frozen before patching must stay frozen
    reference.bert.embeddings.requires_grad_(False)
    model.bert.pooler.dense.double()  # an odd dtype must stay as it is
    reference.bert.pooler.dense.double()
    before = {n: (id(p), p.data_ptr(), p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()}
    keys_before = list(model.state_dict().keys())
    # SGD: the update is the gradient, so parity of the steps checks parity of the gradients (Adam's
    # normalization would blow float rounding of near-zero gradients up to lr-sized steps).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    ref_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    initial = model.classifier.weight.detach().clone()

    fastbert.patch(model)
    after = {n: (id(p), p.data_ptr(), p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()}
    assert after == before
    assert list(model.state_dict().keys()) == keys_before

    # Pooler in float64: feed it float64 by hooking its input, in both models alike.
    for m in (model, reference):
        m.bert.pooler.dense.register_forward_pre_hook(lambda mod, args: (args[0].double(),))
        m.classifier.register_forward_pre_hook(lambda mod, args: (args[0].float(),))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        batch = random_batch(config, 4, 10, lengths=[10, 3, 7, 1], generator=g)
        batch["labels"] = torch.randint(0, 2, (4,), generator=g)
        for m, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            m(**batch).loss.backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert max_error(p, q) <= 1e-5, name
    assert model.bert.embeddings.word_embeddings.weight.grad is None
    assert max_error(model.classifier.weight, initial) > 1e-3  # the optimizer did update the parameters


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForSequenceClassification", "BertForQuestionAnswering"])
def test_training_mode_loss_and_every_gradient_match(name):
    config = small_config()
    model, reference = hf_pair(name, config, train=True)
    fastbert.patch(model)
    g = torch.Generator().manual_seed(2)
    # QA's loss is a softmax over every position, padding included; fastbert's hidden states are zeros
    # at padding (HF's are not), so QA losses agree only without padding. Logits on real tokens always do.
    lengths = [12, 12, 12] if name == "BertForQuestionAnswering" else [12, 7, 3]
    batch = random_batch(config, 3, 12, lengths=lengths, generator=g)
    if name == "BertForMaskedLM":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    elif name == "BertForSequenceClassification":
        batch["labels"] = torch.tensor([1, 0, 1])
    else:
        batch["start_positions"], batch["end_positions"] = torch.tensor([0, 2, 1]), torch.tensor([5, 6, 2])
    loss, grads = loss_and_grads(model, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert max_error(loss, ref_loss) <= 1e-5
    assert_grads_close(grads, ref_grads)


class TwoEncoders(torch.nn.Module):
    """A user's own module holding BERTs at different depths (a bi-encoder)."""

    def __init__(self, config):
        super().__init__()
        self.query_encoder = transformers.BertModel(config)
        self.towers = torch.nn.ModuleList([transformers.BertForSequenceClassification(config)])


def test_patch_finds_every_bert_in_a_container_and_deepcopy_keeps_the_mark():
    model = TwoEncoders(small_config())
    fastbert.patch(model)
    assert type(model.query_encoder) is fastbert.BertModel
    assert type(model.towers[0].bert) is fastbert.BertModel
    fastbert.patch(model)  # idempotent
    twin = copy.deepcopy(model)
    fastbert.unpatch(twin)
    assert type(twin.query_encoder) is hf.BertModel and type(twin.towers[0].bert) is hf.BertModel
    assert type(model.query_encoder) is fastbert.BertModel  # the original is untouched


def test_native_fastbert_models_are_left_alone():
    native = fastbert.BertForSequenceClassification(small_config())
    fastbert.patch(native)
    fastbert.unpatch(native)  # unpatch only undoes what patch did
    assert type(native.bert) is fastbert.BertModel


def test_patch_refuses_models_without_bert():
    with pytest.raises(ValueError, match="contains no model of a family fastbert supports"):
        fastbert.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        fastbert.patch("bert-base-uncased")


def test_full_signature_on_the_fast_path(encode_calls):
    config = small_config()
    model, reference = hf_pair("BertModel", config)
    fastbert.patch(model)
    batch = random_batch(config, 2, 8, lengths=[8, 5])
    mask = batch["attention_mask"]
    keep = mask.bool()
    embeds = torch.randn(2, 8, config.hidden_size)
    position_ids = torch.arange(8).flip(0)[None]
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    inputs = dict(token_type_ids=batch["token_type_ids"], position_ids=position_ids, output_hidden_states=True)
    with torch.no_grad():
        ref = reference(inputs_embeds=embeds, attention_mask=mask, **inputs)
        for fast_mask in (mask, keep, additive, keep[:, None, None, :]):
            out = model(inputs_embeds=embeds, attention_mask=fast_mask, **inputs)
            assert_outputs_close(out, ref, mask)
        ref_ids = reference(input_ids=batch["input_ids"], attention_mask=mask, return_dict=False)
        out_ids = model(input_ids=batch["input_ids"], attention_mask=mask, return_dict=False)
    assert isinstance(out_ids, tuple) and len(out_ids) == len(ref_ids)
    assert max_error(real_tokens(out_ids[0], mask), real_tokens(ref_ids[0], mask)) <= 1e-5
    assert max_error(out_ids[1], ref_ids[1]) <= 1e-5
    assert len(encode_calls) == 5  # every call above took the fast path


def test_output_attentions_runs_the_plain_path_with_one_warning(encode_calls):
    config = small_config()
    model, reference = hf_pair("BertModel", config)
    for m in (model, reference):
        m.set_attn_implementation("eager")
    fastbert.patch(model)
    batch = random_batch(config, 2, 6, lengths=[6, 3])
    fast_bert._warned_reasons.clear()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="output_attentions=True is not on the fast path"):
            out = model(**batch, output_attentions=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            model(**batch, output_attentions=True)
        ref = reference(**batch, output_attentions=True)
    assert not encode_calls
    assert len(out.attentions) == config.num_hidden_layers
    for a, b in zip(out.attentions, ref.attentions):
        assert torch.equal(a, b)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
