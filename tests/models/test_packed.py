"""fastbert.encode_packed against the padded path (the model's own forward on the same sequences, right-padded):
bitwise in fp32 when the padded batch has padding (both run one packed layout), within 1e-6 when it has none
(dense attention there); against transformers within 1e-5. Fresh random lengths, ids and token types."""
from __future__ import annotations

import pytest
import torch
import transformers

import fastbert
from fastbert.models import plan
from fastbert.models.families import family_of_model_type
from tests.helpers import max_error
from tests.models.family_configs import MODEL_TYPES, family_batch, family_config, hf_and_fast

TYPES = (*MODEL_TYPES, "deberta-v2")


def packed_inputs(batch: dict) -> dict:
    """The padded batch's real tokens back to back, its cu_seqlens, its token types (if any)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    types = batch.get("token_type_ids")
    return {"input_ids": batch["input_ids"][mask], "cu_seqlens": cu_seqlens,
            "token_type_ids": None if types is None else types[mask]}


def fresh_lengths(seqlen: int, count: int = 5) -> list[int]:
    lengths = torch.randint(1, seqlen + 1, (count,)).tolist()
    lengths[0] = seqlen  # the longest fills the padded batch
    lengths[-1] = 1
    return lengths


def run_packed(model, packed: dict, **kwargs):
    with torch.no_grad():
        return fastbert.encode_packed(model, packed["input_ids"], packed["cu_seqlens"],
                                      token_type_ids=packed["token_type_ids"], **kwargs)


def padded(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("model_type", TYPES)
def test_every_family_bitwise_the_padded_path_and_close_to_transformers(model_type):
    config = family_config(model_type)
    family = family_of_model_type(model_type)
    reference, model = hf_and_fast(f"{family.class_prefix}Model", config)
    torch.manual_seed(torch.seed() % 1000)
    batch = family_batch(config, fresh_lengths(20), 20)
    mask = batch["attention_mask"].bool()
    out = run_packed(model, packed_inputs(batch))
    assert torch.equal(out.last_hidden_state, padded(model, batch)[mask])
    assert max_error(out.last_hidden_state, padded(reference, batch)[mask]) < 1e-5
    assert out.pooled is None


def test_deberta_takes_sequences_past_max_position_embeddings():
    config = family_config("deberta-v2")  # no absolute positions: no length limit, as in transformers
    reference, model = hf_and_fast("DebertaV2Model", config)
    batch = family_batch(config, [70, 9], 70)
    out = run_packed(model, packed_inputs(batch))
    assert torch.equal(out.last_hidden_state, padded(model, batch)[batch["attention_mask"].bool()])


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_runs_the_inference_plan_bitwise_the_general_forward(model_type, monkeypatch):
    runs = []
    original = plan.Plan.run
    monkeypatch.setattr(plan.Plan, "run", lambda self, *a: runs.append(a[1]) or original(self, *a))
    _, model = hf_and_fast(f"{family_of_model_type(model_type).class_prefix}Model", family_config(model_type))
    packed = packed_inputs(family_batch(family_config(model_type), fresh_lengths(30), 30))
    planned = run_packed(model, packed).last_hidden_state
    assert len(runs) == 1 and runs[0].packed_inputs  # the plan ran on the packed layout
    plan.set_plans(False)
    try:
        general = run_packed(model, packed).last_hidden_state
    finally:
        plan.set_plans(True)
    assert len(runs) == 1 and torch.equal(planned, general)


def test_equal_lengths_agree_with_the_dense_padded_batch():
    _, model = hf_and_fast("BertModel", family_config("bert"))
    batch = family_batch(family_config("bert"), [24, 24, 24], 24)
    out = run_packed(model, packed_inputs(batch))
    assert max_error(out.last_hidden_state, padded(model, batch).reshape(-1, 32)) < 1e-6


def test_mean_and_cls_pooling_against_the_padded_output():
    config = family_config("bert")
    _, model = hf_and_fast("BertModel", config)
    batch = family_batch(config, fresh_lengths(25, 6), 25)
    hidden, mask = padded(model, batch), batch["attention_mask"].unsqueeze(-1).float()
    mean = run_packed(model, packed_inputs(batch), pooling="mean").pooled
    cls = run_packed(model, packed_inputs(batch), pooling="cls").pooled
    assert mean.dtype == torch.float32 and mean.shape == (6, 32)
    assert max_error(mean, (hidden * mask).sum(1) / mask.sum(1)) < 1e-6
    assert torch.equal(cls, hidden[:, 0])


def test_fairseq_positions_skip_pad_ids_inside_a_sequence():
    """RoBERTa numbers positions by counting non-pad ids: a pad id inside a sequence (mask 1) keeps
    padding_idx and does not advance the count, in each sequence separately."""
    config = family_config("roberta")
    _, model = hf_and_fast("RobertaModel", config)
    batch = family_batch(config, [12, 9, 5], 12)
    batch["input_ids"][0, 3] = batch["input_ids"][1, 0] = batch["input_ids"][1, 4] = config.pad_token_id
    out = run_packed(model, packed_inputs(batch))
    assert torch.equal(out.last_hidden_state, padded(model, batch)[batch["attention_mask"].bool()])


def test_token_types_default_to_zero():
    config = family_config("bert")
    _, model = hf_and_fast("BertModel", config)
    batch = family_batch(config, [10, 4], 10)
    batch["token_type_ids"].zero_()
    packed = packed_inputs(batch)
    with_types = run_packed(model, packed).last_hidden_state
    packed["token_type_ids"] = None
    assert max_error(run_packed(model, packed).last_hidden_state, with_types) < 1e-6


def test_a_head_runs_its_base_model_and_a_plain_transformers_model_runs_too():
    config = family_config("bert")
    reference, model = hf_and_fast("BertForSequenceClassification", config)
    batch = family_batch(config, [10, 3, 7], 10)
    packed = packed_inputs(batch)
    expected = padded(model.bert, batch)[batch["attention_mask"].bool()]
    assert torch.equal(run_packed(model, packed).last_hidden_state, expected)
    assert torch.equal(run_packed(reference.bert, packed).last_hidden_state, expected)


def test_empty_sequences_and_no_tokens():
    _, model = hf_and_fast("BertModel", family_config("bert"))
    batch = family_batch(family_config("bert"), [6, 4], 6)
    packed = packed_inputs(batch)
    packed["cu_seqlens"] = torch.tensor([0, 0, 6, 6, 10, 10], dtype=torch.int32)
    out = run_packed(model, packed, pooling="mean")
    assert torch.equal(out.last_hidden_state, padded(model, batch)[batch["attention_mask"].bool()])
    assert out.pooled[[0, 2, 4]].abs().max() == 0
    none = fastbert.encode_packed(model, torch.zeros(0, dtype=torch.long), torch.tensor([0, 0], dtype=torch.int32),
                                  pooling="cls")
    assert none.last_hidden_state.shape == (0, 32) and torch.equal(none.pooled, torch.zeros(1, 32))


def bad(cu_seqlens, ids=None, **kwargs):
    _, model = hf_and_fast("BertModel", family_config("bert"))
    ids = torch.randint(3, 90, (10,)) if ids is None else ids
    return fastbert.encode_packed(model, ids, torch.tensor(cu_seqlens, dtype=torch.int32), **kwargs)


@pytest.mark.parametrize("cu_seqlens, match", [
    ([1, 4, 10], r"cu_seqlens\[0\] is 1; it must be 0"),
    ([0, 6, 4, 10], r"decreases at index 2 \(6 then 4\)"),
    ([0, 4, 9], r"cu_seqlens\[-1\] is 9 but input_ids holds 10 tokens"),
])
def test_bad_cu_seqlens_name_the_value(cu_seqlens, match):
    with pytest.raises(ValueError, match=match):
        bad(cu_seqlens)


def test_a_sequence_over_the_position_limit_names_it():
    with pytest.raises(ValueError, match=r"sequence 1 .* has 33 tokens but this model takes at most 32"):
        bad([0, 2, 35], ids=torch.randint(3, 90, (35,)))
    config = family_config("roberta")  # positions from padding_idx + 1: 34 - 2 = 32 tokens
    _, model = hf_and_fast("RobertaModel", config)
    with pytest.raises(ValueError, match="has 33 tokens but this model takes at most 32"):
        fastbert.encode_packed(model, torch.randint(3, 90, (33,)), torch.tensor([0, 33], dtype=torch.int32))


def test_wrong_dtypes_shapes_values_and_arguments():
    with pytest.raises(TypeError, match=r"input_ids must have dtype torch.int64, got torch.int32"):
        bad([0, 10], ids=torch.randint(3, 90, (10,), dtype=torch.int32))
    with pytest.raises(TypeError, match=r"cu_seqlens must have dtype torch.int32, got torch.int64"):
        _, model = hf_and_fast("BertModel", family_config("bert"))
        fastbert.encode_packed(model, torch.randint(3, 90, (10,)), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"input_ids must be 1-D"):
        bad([0, 10], ids=torch.randint(3, 90, (1, 10)))
    with pytest.raises(ValueError, match=r"input_ids contains 96, but vocab_size=96"):
        bad([0, 10], ids=torch.full((10,), 96))
    with pytest.raises(ValueError, match=r"token_type_ids contains 2, but type_vocab_size=2"):
        bad([0, 10], token_type_ids=torch.full((10,), 2))
    with pytest.raises(ValueError, match=r"token_type_ids must have input_ids' shape"):
        bad([0, 10], token_type_ids=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pooling='max': expected one of mean, cls"):
        bad([0, 10], pooling="max")


def test_models_it_does_not_run_are_refused():
    with pytest.raises(fastbert.UnsupportedModelError, match="Linear is not a base model"):
        fastbert.encode_packed(torch.nn.Linear(2, 2), torch.zeros(1, dtype=torch.long),
                               torch.tensor([0, 1], dtype=torch.int32))
    modernbert = fastbert.AutoModel.from_config(transformers.ModernBertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2))
    with pytest.raises(fastbert.UnsupportedModelError, match="ModernBERT unpads its own padded batch"):
        fastbert.encode_packed(modernbert, torch.zeros(1, dtype=torch.long), torch.tensor([0, 1], dtype=torch.int32))
    _, distilbert = hf_and_fast("DistilBertModel", family_config("distilbert"))
    with pytest.raises(ValueError, match="token_type_ids: DistilBERT has no token types"):
        fastbert.encode_packed(distilbert, torch.ones(3, dtype=torch.long), torch.tensor([0, 3], dtype=torch.int32),
                               token_type_ids=torch.zeros(3, dtype=torch.long))
    _, model = hf_and_fast("BertModel", family_config("bert"))
    model.encoder.layer[0].intermediate.intermediate_act_fn = torch.nn.Softplus()  # not a module it knows
    with pytest.raises(ValueError, match=r"encode_packed: the module .*intermediate_act_fn.* is not on the fast path"):
        fastbert.encode_packed(model, torch.ones(3, dtype=torch.long), torch.tensor([0, 3], dtype=torch.int32))


def test_with_autograd_the_general_forward_runs_and_gradients_match_the_padded_path():
    config = family_config("bert")
    _, model = hf_and_fast("BertModel", config)
    batch = family_batch(config, fresh_lengths(16, 4), 16)
    packed = packed_inputs(batch)
    out = fastbert.encode_packed(model, packed["input_ids"], packed["cu_seqlens"],
                                 token_type_ids=packed["token_type_ids"], pooling="mean")
    out.pooled.square().sum().backward()
    encoder = [p for name, p in model.named_parameters() if not name.startswith("pooler.")]  # not run packed
    packed_grads = [p.grad.clone() for p in encoder]
    model.zero_grad()
    hidden, mask = model(**batch).last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
    ((hidden * mask).sum(1) / mask.sum(1)).square().sum().backward()
    assert torch.equal(out.last_hidden_state.detach(), hidden[batch["attention_mask"].bool()].detach())
    assert max(max_error(a, p.grad) for a, p in zip(packed_grads, encoder)) < 1e-5
