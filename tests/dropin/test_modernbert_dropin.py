"""The three drop-in bugs of issue 19 on ModernBERT (every class, native and patched), and every argument
of transformers' ModernBertModel.forward: matched by the fast path, or run by transformers with one warning.

A. output_hidden_states as a list of indices (or one index) selects what transformers selects.
B. The decision to run transformers' forward comes before input validation.
C. The fast forward keeps transformers' signature.
"""
import inspect

import pytest
import torch
import transformers
from transformers.utils.generic import TransformersKwargs

from fastbert.models import modernbert
from fastbert.models.arguments import PLAIN_PATH, RULES, SELECTS_HIDDEN_STATES_BY_INDEX
from fastbert.models.native import _warned_reasons
from tests.dropin._common import count_calls
from tests.dropin.test_dropin_bugs import _assert_same_selection, _quiet_call, needs_config_indices
from tests.dropin.test_forward_arguments import (
    EXAMPLES,
    HEAD_ONLY,
    _assert_same_outputs,
    _call,
    _parameters,
    assert_matches_or_falls_back,
)
from tests.models.test_modernbert import HEADS, modernbert_config, pair

BATCH, SEQ = 2, 6  # SEQ: the sequence length test_dropin_bugs._assert_same_selection reads
SELECTIONS = [[0, 2], [-1], 1, (0, -1, 7), [], 0, [5]]
needs_index_selection = pytest.mark.skipif(
    not SELECTS_HIDDEN_STATES_BY_INDEX,
    reason=f"transformers {transformers.__version__} reads output_hidden_states indices otherwise "
           "(no initial hidden state, no negatives): the fast path runs its forward (test_indices_fall_back...)")


def _batch(suffix: str) -> dict:
    mask = torch.ones(4, SEQ, dtype=torch.long)
    mask[1, 3:] = mask[3, 2:] = 0
    ids = torch.randint(3, 100, (4, SEQ), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    if suffix == "ForMultipleChoice":
        return dict(input_ids=ids.view(2, 2, SEQ), attention_mask=mask.view(2, 2, SEQ))
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
@pytest.mark.parametrize("suffix", HEADS)
def test_output_hidden_states_list_selects_layers_in_every_class(suffix, patched):
    reference, fast = pair(suffix, modernbert_config(), patched)
    _assert_same_selection(fast, reference, _batch(suffix), [0, 2])


@needs_index_selection
@pytest.mark.parametrize("selection", SELECTIONS)
def test_output_hidden_states_indices_stay_on_the_fast_path(selection, encode_calls):
    reference, fast = pair("Model", modernbert_config(), patched=True)
    _assert_same_selection(fast, reference, _batch("Model"), selection)
    assert encode_calls


@pytest.mark.skipif(SELECTS_HIDDEN_STATES_BY_INDEX, reason="this transformers selects by index as fastbert does")
@pytest.mark.parametrize("selection", SELECTIONS)
def test_indices_fall_back_where_transformers_reads_them_otherwise(selection, encode_calls):
    reference, fast = pair("Model", modernbert_config(), patched=True)
    _assert_same_selection(fast, reference, _batch("Model"), selection)
    assert not encode_calls


@needs_config_indices
def test_output_hidden_states_list_from_the_config():
    reference, fast = pair("Model", modernbert_config(), patched=False)
    for model in (reference, fast):
        model.config.output_hidden_states = [1]
    batch = _batch("Model")
    out, ref = _quiet_call(fast, batch).hidden_states, _quiet_call(reference, batch).hidden_states
    assert [state is None for state in out] == [state is None for state in ref]


@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_a_dict_of_masks_falls_back_unvalidated(patched):
    """transformers takes a dict of per-layer-type masks; validation (tensors only) must not see it."""
    reference, fast = pair("Model", modernbert_config(), patched)
    batch = _batch("Model")
    bias = torch.zeros(4, 1, SEQ, SEQ)
    masks = {"full_attention": bias, "sliding_attention": bias}
    out = _quiet_call(fast, {"input_ids": batch["input_ids"], "attention_mask": masks})
    ref = _quiet_call(reference, {"input_ids": batch["input_ids"], "attention_mask": masks})
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)


def test_output_attentions_with_a_long_mask_falls_back_unvalidated():
    """A call that runs transformers' forward is checked by transformers alone (here: a mask longer than the ids)."""
    reference, fast = pair("Model", modernbert_config(), patched=True)
    ids = _batch("Model")["input_ids"]
    arguments = dict(input_ids=ids, attention_mask=torch.ones(4, SEQ + 2, dtype=torch.long), output_attentions=True)
    outcomes = []
    for model in (fast, reference):
        try:
            outcomes.append(_quiet_call(model, arguments).last_hidden_state)
        except Exception as error:  # noqa: BLE001 - compared with transformers' own outcome
            outcomes.append(type(error))
    assert outcomes[0] is outcomes[1] if isinstance(outcomes[1], type) else torch.equal(*outcomes)


@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
@pytest.mark.parametrize("suffix", HEADS)
def test_forward_keeps_transformers_signature(suffix, patched):
    reference, fast = pair(suffix, modernbert_config(), patched)
    assert inspect.signature(fast.forward) == inspect.signature(reference.forward)
    base = fast.base_model
    assert inspect.signature(base.forward) == inspect.signature(reference.base_model.forward)
    assert base.forward.__name__ == "forward" and base.forward.__doc__ == reference.base_model.forward.__doc__


# ---- every argument ----------------------------------------------------------------------------------------

EXTRA = ("return_dict", "token_type_ids", "use_cache")  # not in the signature, but callers pass them
MODERNBERT_EXAMPLES = {
    **EXAMPLES,
    "position_ids": lambda model, config, batch: torch.arange(SEQ).expand(BATCH, SEQ).flip(-1).clone(),
    "token_type_ids": lambda model, config, batch: torch.zeros(BATCH, SEQ, dtype=torch.long),
}


def _argument_names() -> list[str]:
    names = _parameters(transformers.ModernBertModel) + list(TransformersKwargs.__annotations__) + list(EXTRA)
    return list(dict.fromkeys(names))


def test_every_parameter_has_a_rule_and_an_example():
    assert [name for name in _argument_names() if name not in RULES] == []
    assert [name for name in _argument_names() if name not in MODERNBERT_EXAMPLES] == []


@pytest.mark.parametrize("suffix", HEADS[1:])
def test_every_head_parameter_is_the_heads_own_or_reaches_a_rule(suffix):
    head = getattr(transformers, "ModernBert" + suffix)
    assert [name for name in _parameters(head) if name not in RULES and name not in HEAD_ONLY] == []


@pytest.fixture
def encode_calls(monkeypatch):
    calls = count_calls(monkeypatch, modernbert, "encode")
    _warned_reasons.clear()
    return calls


@pytest.mark.parametrize("name", _argument_names())
def test_each_argument_matches_transformers_or_falls_back(name, encode_calls):
    reference, fast = pair("Model", modernbert_config(), patched=True)
    batch = {key: value[:BATCH] for key, value in _batch("Model").items()}
    value = MODERNBERT_EXAMPLES[name](reference, reference.config, batch)
    assert_matches_or_falls_back(reference, fast, batch, name, value, encode_calls)


@pytest.mark.parametrize("flag,value,call", [
    ("output_attentions", True, {}),
    ("return_dict", False, {}),
    ("return_dict", False, {"return_dict": None}),  # an explicit None: a ModelOutput, as transformers
    ("output_hidden_states", True, {"output_hidden_states": None}),  # an explicit None: no hidden states
])
def test_config_defaults_are_read_as_transformers_reads_them(flag, value, call, encode_calls):
    config = modernbert_config()
    setattr(config, flag, value)
    reference, fast = pair("Model", config, patched=True)
    batch = {**{key: value[:BATCH] for key, value in _batch("Model").items()}, **call}
    ref, _, _ = _call(reference, batch, flag, None, encode_calls)
    out, fast_path, messages = _call(fast, batch, flag, None, encode_calls)
    _assert_same_outputs(out, ref, batch["attention_mask"].bool())
    assert fast_path is (RULES[flag] != PLAIN_PATH) and bool(messages) is not fast_path


def test_trainers_num_items_in_batch_stays_on_the_fast_path(encode_calls):
    reference, fast = pair("ForSequenceClassification", modernbert_config(), patched=True)
    batch = {**_batch("Model"), "labels": torch.tensor([0, 1, 2, 1])}
    ref, _, _ = _call(reference, batch, "num_items_in_batch", torch.tensor(2), encode_calls)
    out, fast_path, messages = _call(fast, batch, "num_items_in_batch", torch.tensor(2), encode_calls)
    assert fast_path and not messages
    assert (out.loss - ref.loss).abs() <= 1e-5

