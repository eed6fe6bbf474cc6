"""The three drop-in bugs transformers' own model tests found (issue 19), on every family and class.

A. output_hidden_states may be a list of layer indices (or one index): the same hidden states come
   back as transformers returns, None where not selected.
B. The decision to run transformers' forward comes before input validation: a decoder step with a
   cache and a mask longer than input_ids (what generate() passes) runs, as it does unpatched.
C. The fast forward keeps transformers' signature: inspect.signature(model.forward) is the same.

Older transformers (5.17) reads indices its own way (no initial hidden state, no negative indices) and its
configs reject a list: there the fast path runs transformers' forward for indices, and these tests check
that the outcome is still transformers' own (config lists are skipped where the config rejects them).
"""
import copy
import inspect
import warnings

import pytest
import torch
import transformers

import fastbert
from fastbert.models import arguments
from fastbert.models.families import FAMILIES, family_of_model_type
from tests.dropin._common import real_tokens
from tests.helpers import max_error, small_config
from tests.models.family_configs import MODEL_TYPES, family_batch, family_config

TOL = 1e-5
LENGTHS = [6, 3, 5, 2]


def config_takes_hidden_state_indices() -> bool:
    """Whether the installed transformers' configs accept output_hidden_states=[1] (5.17's reject a list)."""
    try:
        transformers.PretrainedConfig().output_hidden_states = [1]
    except Exception:  # noqa: BLE001 - 5.17 raises huggingface_hub's StrictDataclassFieldValidationError
        return False
    return True


needs_config_indices = pytest.mark.skipif(
    not config_takes_hidden_state_indices(),
    reason=f"transformers {transformers.__version__}'s configs reject output_hidden_states as a list")


def test_index_selection_is_detected_as_transformers_behaves():
    """The capability check (the name of a transformers function) must not go stale: it must say what
    transformers does with output_hidden_states=[0] (5.24: the embeddings' output, of layers + 1 states)."""
    config = family_config("bert")
    model = transformers.BertModel(config).eval()
    states = _quiet_call(model, {"input_ids": torch.randint(3, config.vocab_size, (1, 4))},
                         output_hidden_states=[0]).hidden_states
    by_index = len(states) == config.num_hidden_layers + 1 and states[0] is not None and states[1] is None
    assert arguments.SELECTS_HIDDEN_STATES_BY_INDEX is by_index


def _class_cases():
    return [(family.model_type, suffix) for family in FAMILIES for suffix in ("Model", *family.heads)]


def _batch(config, suffix):
    batch = family_batch(config, LENGTHS, 6, "right", torch.Generator().manual_seed(3))
    if suffix == "ForMultipleChoice":
        return {key: value.view(2, 2, 6) for key, value in batch.items()}
    return batch


def _models(model_type, suffix, patched):
    """(transformers model, fastbert model: native class or patched copy), same weights, eval mode."""
    config = family_config(model_type)
    hf_class = family_of_model_type(model_type).hf_class(suffix)
    torch.manual_seed(0)
    reference = hf_class(config).eval()
    if patched:
        return reference, fastbert.patch(copy.deepcopy(reference))
    fast = getattr(fastbert, hf_class.__name__)(config).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _quiet_call(model, batch, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**batch, **kwargs)


def _assert_same_selection(fast, reference, batch, selection):
    keep = batch["attention_mask"].reshape(-1, 6).bool()
    out = _quiet_call(fast, batch, output_hidden_states=selection).hidden_states
    ref = _quiet_call(reference, batch, output_hidden_states=selection).hidden_states
    if ref is None:
        assert out is None
        return
    assert [state is None for state in out] == [state is None for state in ref]
    for mine, theirs in zip(out, ref):
        if theirs is not None:
            assert max_error(real_tokens(mine, keep), real_tokens(theirs, keep)) <= TOL


@pytest.mark.parametrize("model_type,suffix", _class_cases())
@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_output_hidden_states_list_selects_layers_in_every_class(model_type, suffix, patched):
    reference, fast = _models(model_type, suffix, patched)
    _assert_same_selection(fast, reference, _batch(reference.config, suffix), [0, 2])


@pytest.mark.parametrize("selection", [[-1], 1, (0, -1, 7), [], 0, [5]])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_hidden_states_indices_resolve_as_transformers_does(model_type, selection):
    reference, fast = _models(model_type, "Model", patched=True)
    _assert_same_selection(fast, reference, _batch(reference.config, "Model"), selection)


@needs_config_indices
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_hidden_states_list_from_the_config(model_type):
    reference, fast = _models(model_type, "Model", patched=True)
    for model in (reference, fast):
        model.config.output_hidden_states = [1]
    batch = _batch(reference.config, "Model")
    out, ref = _quiet_call(fast, batch).hidden_states, _quiet_call(reference, batch).hidden_states
    # MPNet's forward reads output_hidden_states as a flag (no capture_outputs): every state
    selects = "hidden_states" in (type(reference)._can_record_outputs or {})
    expected = [True, False, True] if selects else [False, False, False]
    assert [state is None for state in out] == [state is None for state in ref] == expected


def _decoder_pair(name, config):
    torch.manual_seed(0)
    reference = getattr(transformers, name)(config).eval()
    return reference, copy.deepcopy(reference)


def _cached_step(model, ids, mask):
    """A first forward with use_cache, then one step of two new tokens with the whole mask."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = model(ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True)
        past = first.cache if "cache" in first else first.past_key_values  # transformers < 5.24: past_key_values
        return model(ids[:, -2:], attention_mask=mask, past_key_values=past).logits


@pytest.mark.parametrize("name,config,patched", [
    ("BertLMHeadModel", small_config(is_decoder=True), True),  # fastbert has no native BertLMHeadModel
    ("RobertaForCausalLM", family_config("roberta", is_decoder=True), True),
    ("RobertaForCausalLM", family_config("roberta", is_decoder=True), False),
    ("ElectraForCausalLM", family_config("electra", is_decoder=True), False),
], ids=["bert-patch", "roberta-patch", "roberta-native", "electra-native"])
def test_a_decoder_step_with_a_cache_and_the_whole_mask_falls_back_unvalidated(name, config, patched):
    reference, fast = _decoder_pair(name, config)
    if patched:
        fastbert.patch(fast)
    else:
        fast = getattr(fastbert, name)(config).eval()
        fast.load_state_dict(reference.state_dict())
    ids = torch.randint(3, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as generate() sees it
    assert max_error(_cached_step(fast, ids, mask), _cached_step(reference, ids, mask)) == 0


def test_generate_with_a_padded_mask_on_a_patched_decoder():
    config = small_config(is_decoder=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    reference, fast = _decoder_pair("BertLMHeadModel", config)
    fastbert.patch(fast)
    ids = torch.randint(3, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    ids[0, :2] = 0
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(fast.generate(ids, **settings), reference.generate(ids, **settings))


@pytest.mark.parametrize("model_type,suffix", _class_cases())
@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_forward_keeps_transformers_signature(model_type, suffix, patched):
    reference, fast = _models(model_type, suffix, patched)
    assert inspect.signature(fast.forward) == inspect.signature(reference.forward)
    base = fast.base_model
    assert inspect.signature(base.forward) == inspect.signature(reference.base_model.forward)
    assert base.forward.__name__ == "forward" and base.forward.__doc__ == reference.base_model.forward.__doc__


def test_validate_false_still_accepted_by_a_patched_base_model():
    config = small_config()
    torch.manual_seed(0)
    model = fastbert.patch(transformers.BertModel(config).eval())
    ids = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        unchecked = model(ids, attention_mask=torch.full((2, 8), 2), validate=False).last_hidden_state
        checked = model(ids, attention_mask=torch.ones(2, 8, dtype=torch.long)).last_hidden_state
    assert torch.equal(unchecked, checked)
