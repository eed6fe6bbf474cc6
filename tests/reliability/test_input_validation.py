"""Input validation at the model boundary (fastbert.models.validation.validate_inputs).

The model-level tests go through the public API (fastbert.BertModel and the heads): forward calls
validate_inputs once the call is known to stay on the fast path; a call that falls back to
transformers' forward (decoder, cache, output_attentions, ...) gets transformers' own checks.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastbert
from fastbert.models.validation import should_validate, validate_inputs
from tests.helpers import small_config

CONFIG = small_config()  # vocab 128, 64 positions, 2 token types, hidden 64
CPU = torch.device("cpu")


def ids(*shape, high=CONFIG.vocab_size):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(0))


def check(**inputs):
    validate_inputs(
        CONFIG,
        CPU,
        inputs.get("input_ids"),
        inputs.get("attention_mask"),
        inputs.get("token_type_ids"),
        inputs.get("position_ids"),
        inputs.get("inputs_embeds"),
    )


# ---- validate_inputs on its own ------------------------------------------------------------------


def test_valid_inputs_pass():
    check(
        input_ids=ids(2, 8),
        attention_mask=torch.ones(2, 8, dtype=torch.long),
        token_type_ids=torch.ones(2, 8, dtype=torch.long),
        position_ids=torch.arange(8)[None],
    )
    check(input_ids=ids(2, 64).int(), attention_mask=torch.ones(2, 64, dtype=torch.bool))
    check(inputs_embeds=torch.randn(2, 8, 64), attention_mask=torch.zeros(2, 1, 1, 8))
    check(input_ids=ids(2, 8), attention_mask=torch.zeros(2, 1, 8, 8, dtype=torch.bool))
    check(input_ids=ids(2, 8), attention_mask=torch.ones(2, 8))  # float 0/1 masks are HF's too


@pytest.mark.parametrize(
    "bad_id,message",
    [
        (128, "input_ids contains 128, but vocab_size=128"),
        (10**6, "input_ids contains 1000000"),
        (-1, "below the minimum 0"),
    ],
)
def test_token_id_out_of_range(bad_id, message):
    input_ids = ids(2, 8)
    input_ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=message):
        check(input_ids=input_ids)


def test_sequence_longer_than_max_position_embeddings():
    with pytest.raises(ValueError, match="sequence length is 65 .*max_position_embeddings=64"):
        check(input_ids=ids(1, 65))
    with pytest.raises(ValueError, match="sequence length is 65"):
        check(inputs_embeds=torch.randn(1, 65, 64))


@pytest.mark.parametrize("bad_type", [2, -1])
def test_token_type_out_of_range(bad_type):
    token_type_ids = torch.zeros(2, 8, dtype=torch.long)
    token_type_ids[0, -1] = bad_type
    with pytest.raises(ValueError, match=f"token_type_ids contains {bad_type}"):
        check(input_ids=ids(2, 8), token_type_ids=token_type_ids)


@pytest.mark.parametrize("bad_position", [64, -3])
def test_position_ids_out_of_range(bad_position):
    position_ids = torch.arange(8)[None].repeat(2, 1)
    position_ids[1, 2] = bad_position
    with pytest.raises(ValueError, match=f"position_ids contains {bad_position}"):
        check(input_ids=ids(2, 8), position_ids=position_ids)


def test_explicit_positions_are_checked_by_value_not_by_length():
    # 8 tokens whose explicit positions lie inside the table are fine; so is a (1, seq) broadcast.
    check(input_ids=ids(2, 8), position_ids=torch.full((1, 8), 63))


@pytest.mark.parametrize(
    "mask,message",
    [
        (torch.ones(2, 9, dtype=torch.long), r"shape of input_ids \(batch, seq\) = \(2, 8\), got \(2, 9\)"),
        (torch.ones(3, 8, dtype=torch.long), r"got \(3, 8\)"),
        (torch.ones(2, 1, 8), "must be 2-D"),
        (torch.ones(8, dtype=torch.long), "must be 2-D"),
        (torch.zeros(2, 1, 1, 9), r"4-D attention_mask must have shape"),
        (torch.zeros(2, 4, 8, 8), r"4-D attention_mask must have shape"),
        (torch.zeros(1, 1, 1, 8), r"4-D attention_mask must have shape"),
    ],
)
def test_mask_shape_that_does_not_fit_input_ids(mask, message):
    with pytest.raises(ValueError, match=message):
        check(input_ids=ids(2, 8), attention_mask=mask)


def test_mask_dtype_and_values():
    with pytest.raises(TypeError, match="attention_mask must be a bool, integer or float tensor"):
        check(input_ids=ids(2, 8), attention_mask=torch.ones(2, 8, dtype=torch.complex64))
    # A 2-D additive mask (-10000 at padding) would read as "keep everything": refused.
    additive = torch.zeros(2, 8)
    additive[:, 6:] = -10000.0
    with pytest.raises(ValueError, match="2-D attention_mask holds 1 .* or 0 .*got the value -10000"):
        check(input_ids=ids(2, 8), attention_mask=additive)
    with pytest.raises(ValueError, match="got the value 2"):
        check(input_ids=ids(2, 8), attention_mask=torch.full((2, 8), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_input_ids_must_be_integers(dtype):
    with pytest.raises(TypeError, match=f"input_ids must be an integer tensor.*{dtype}"):
        check(input_ids=ids(2, 8).to(dtype))


def test_other_ids_must_be_integers():
    with pytest.raises(TypeError, match="token_type_ids must be an integer tensor"):
        check(input_ids=ids(2, 8), token_type_ids=torch.zeros(2, 8))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        check(input_ids=ids(2, 8), position_ids=torch.arange(8.0)[None])
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        check(input_ids=[[1, 2, 3]])


def test_shapes_of_ids_and_embeddings():
    with pytest.raises(ValueError, match=r"input_ids must be 2-D \(batch, seq\), got shape \(8,\)"):
        check(input_ids=ids(8))
    with pytest.raises(ValueError, match=r"token_type_ids must have shape \(batch, seq\) = \(2, 8\)"):
        check(input_ids=ids(2, 8), token_type_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, seq, hidden_size=64\)"):
        check(inputs_embeds=torch.randn(2, 8, 32))
    with pytest.raises(TypeError, match="inputs_embeds must be a floating-point tensor"):
        check(inputs_embeds=torch.ones(2, 8, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        check(input_ids=ids(2, 8), inputs_embeds=torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        check()


def test_tensors_on_different_devices():
    # No GPU here: the meta device stands in for "another device"; the check is the same.
    meta_ids = torch.empty(2, 8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="input_ids is on meta but the model's embedding weights are on cpu"):
        check(input_ids=meta_ids)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        check(input_ids=ids(2, 8), attention_mask=torch.ones(2, 8, device="meta"))
    with pytest.raises(ValueError, match="all inputs must be on one device.*input_ids on cpu.*token_type_ids on meta"):
        validate_inputs(CONFIG, None, ids(2, 8), None, torch.zeros(2, 8, dtype=torch.long, device="meta"), None, None)


def test_empty_batch_and_empty_sequence_are_valid():
    check(input_ids=ids(0, 8), attention_mask=torch.ones(0, 8, dtype=torch.long))
    check(input_ids=ids(3, 0), attention_mask=torch.ones(3, 0), token_type_ids=torch.zeros(3, 0, dtype=torch.long))
    check(inputs_embeds=torch.randn(0, 0, 64))


class _SyncCounter:
    """Counts Tensor.tolist / Tensor.item calls (each a host sync on an accelerator)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.calls += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu", "accelerator"])
def test_all_range_checks_share_one_host_sync(monkeypatch, on_cpu):
    """On an accelerator (simulated: the CPU shortcut off), one read for all checks; on CPU, where a read
    syncs nothing, two plain reads per tensor instead of stacking."""
    from fastbert.models import validation

    monkeypatch.setattr(validation, "_reads_are_free", lambda tensors: on_cpu)
    counter = _SyncCounter(monkeypatch)
    check(
        input_ids=ids(4, 16),
        attention_mask=torch.ones(4, 16, dtype=torch.long),
        token_type_ids=torch.zeros(4, 16, dtype=torch.long),
        position_ids=torch.arange(16)[None],
    )
    assert counter.calls == (2 * 4 if on_cpu else 1)


def test_should_validate_switches():
    config = small_config()
    assert should_validate(config) and should_validate(config, True)
    assert not should_validate(config, False)
    config.fastbert_validate = False
    assert not should_validate(config) and should_validate(config, True)


# ---- through the model ---------------------------------------------------------------------------


def _model_error(model, **inputs):
    with pytest.raises((ValueError, TypeError)) as info, torch.no_grad():
        model(**inputs)
    return str(info.value)


def test_model_rejects_out_of_range_ids_before_the_embedding_gather(tiny_model, monkeypatch):
    gathered = []
    monkeypatch.setattr(tiny_model.embeddings.word_embeddings, "forward", lambda x: gathered.append(x))
    input_ids = ids(2, 8)
    input_ids[0, 0] = 128
    assert "input_ids contains 128, but vocab_size=128" in _model_error(tiny_model, input_ids=input_ids)
    assert not gathered, "the embedding gather ran before validation"


def test_model_rejects_each_bad_input(tiny_model):
    assert "max_position_embeddings=64" in _model_error(tiny_model, input_ids=ids(1, 65))
    token_types = torch.full((2, 8), 2)
    assert "type_vocab_size=2" in _model_error(tiny_model, input_ids=ids(2, 8), token_type_ids=token_types)
    positions = torch.full((2, 8), 64)
    assert "max_position_embeddings=64" in _model_error(tiny_model, input_ids=ids(2, 8), position_ids=positions)
    mask = torch.ones(2, 9, dtype=torch.long)
    assert "attention_mask" in _model_error(tiny_model, input_ids=ids(2, 8), attention_mask=mask)
    assert "integer tensor" in _model_error(tiny_model, input_ids=ids(2, 8).float())


def test_a_call_that_falls_back_gets_transformers_own_checks_not_fastbert_validation(tiny_model):
    """The fallback is decided before validation (issue 19, B): fastbert's checks assume the fast path's
    inputs (a mask the shape of input_ids), which a cached decoder step does not pass."""
    input_ids = ids(2, 8)
    input_ids[1, 1] = 999
    with warnings.catch_warnings(), pytest.raises(IndexError, match="index out of range"):
        warnings.simplefilter("ignore")
        tiny_model(input_ids=input_ids, output_attentions=True)
    assert "input_ids contains 999" in _model_error(tiny_model, input_ids=input_ids)


def test_heads_validate_through_their_encoder():
    torch.manual_seed(0)
    head = fastbert.BertForSequenceClassification(CONFIG).eval()
    input_ids = ids(2, 8)
    input_ids[0, 5] = -7
    assert "below the minimum 0" in _model_error(head, input_ids=input_ids)


def test_validation_can_be_switched_off(tiny_model):
    # A 0/2 mask is refused by validation; without it the model reads nonzero as "token" and runs.
    mask = torch.full((2, 8), 2)
    assert "got the value 2" in _model_error(tiny_model, input_ids=ids(2, 8), attention_mask=mask)
    with torch.no_grad():
        skipped = tiny_model(input_ids=ids(2, 8), attention_mask=mask, validate=False).last_hidden_state
        reference = tiny_model(input_ids=ids(2, 8), attention_mask=mask.clamp(max=1)).last_hidden_state
    assert torch.equal(skipped, reference)
    torch.manual_seed(0)
    model = fastbert.BertModel(small_config(fastbert_validate=False)).eval()
    assert_unvalidated_mask_reads_nonzero_as_token(model, "last_hidden_state")


def mask_of_twos():
    """A (2, 8) mask refused by validation: 2 for tokens, 0 for padding, with real padding in row 0."""
    mask = torch.full((2, 8), 2)
    mask[0, 5:] = 0
    return mask


def assert_unvalidated_mask_reads_nonzero_as_token(model, output, **flag):
    """model(**flag) runs a 0/2 mask unvalidated and gives the 0/1 mask's output on the real tokens."""
    mask = mask_of_twos()
    with torch.no_grad():
        skipped = getattr(model(input_ids=ids(2, 8), attention_mask=mask, **flag), output)
        reference = getattr(model(input_ids=ids(2, 8), attention_mask=mask.clamp(max=1)), output)
    keep = mask.bool()
    assert torch.isfinite(skipped[keep]).all()
    assert torch.equal(skipped[keep], reference[keep]), "an unvalidated 0/2 mask changed the output"


def test_heads_pass_validate_false_to_their_encoder():
    torch.manual_seed(0)
    head = fastbert.BertForTokenClassification(CONFIG).eval()
    assert "got the value 2" in _model_error(head, input_ids=ids(2, 8), attention_mask=mask_of_twos())
    assert_unvalidated_mask_reads_nonzero_as_token(head, "logits", validate=False)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 0)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_batch_or_sequence_returns_empty_output(tiny_model, shape, with_mask):
    mask = torch.ones(shape, dtype=torch.long) if with_mask else None
    with torch.no_grad():
        out = tiny_model(input_ids=ids(*shape), attention_mask=mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == (*shape, 64)
    assert out.pooler_output.shape == (shape[0], 64)
    assert len(out.hidden_states) == 3 and all(h.shape == (*shape, 64) for h in out.hidden_states)
    assert torch.isfinite(out.pooler_output).all()


def test_empty_batch_trains():
    torch.manual_seed(0)
    model = fastbert.BertModel(CONFIG).train()
    out = model(input_ids=ids(0, 8), attention_mask=torch.ones(0, 8, dtype=torch.long))
    out.last_hidden_state.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
