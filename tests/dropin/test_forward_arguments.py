"""Every argument of every family's forward: the fast path matches transformers, or falls back to it.

The parameters are enumerated from inspect.signature of transformers' own classes (and the keys of
its TransformersKwargs), so a parameter a future transformers release adds fails these tests until
fastbert.models.arguments.RULES says how the fast path treats it and EXAMPLES below gives a value.
"""
import copy
import inspect
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.utils.generic import TransformersKwargs

import fastbert
import fastbert.models.native as native
from fastbert.models.arguments import INPUT, PLAIN_PATH, RULES, SELECTS_HIDDEN_STATES_BY_INDEX
from fastbert.models.families import FAMILIES, family_of_model_type
from tests.dropin._common import count_calls
from tests.dropin.test_dropin_bugs import needs_config_indices
from tests.helpers import max_error
from tests.models.family_configs import MODEL_TYPES, family_batch, family_config

TOL = 1e-5
BATCH, SEQ = 2, 6

# Parameters of the heads that the head reads itself and never hands to the base model.
HEAD_ONLY = {"labels", "start_positions", "end_positions", "next_sentence_label", "sentence_order_label",
             "logits_to_keep"}


def _positions(config, batch):
    first = family_of_model_type(config.model_type).first_position(config)
    return (torch.arange(SEQ) + first).expand(BATCH, SEQ).clone()


def _embeds(model, batch):
    return model.get_input_embeddings()(batch.pop("input_ids")).detach()


# name -> (model, config, batch) -> the value to pass (may edit the batch). Inputs already in the batch
# return None: the call is the plain batch.
EXAMPLES = {
    "input_ids": lambda model, config, batch: None,
    "attention_mask": lambda model, config, batch: None,
    # (type_vocab_size 0: DeBERTa-v3, whose tokenizer still returns 0/1 token types, which transformers ignores)
    "token_type_ids": lambda model, config, batch: torch.randint(0, config.type_vocab_size or 2, (BATCH, SEQ)),
    "position_ids": lambda model, config, batch: _positions(config, batch),
    "inputs_embeds": lambda model, config, batch: _embeds(model, batch),
    "output_hidden_states": lambda model, config, batch: [0, -1],
    "return_dict": lambda model, config, batch: False,
    "use_cache": lambda model, config, batch: True,
    "encoder_attention_mask": lambda model, config, batch: torch.ones(BATCH, 4, dtype=torch.long),
    "num_items_in_batch": lambda model, config, batch: torch.tensor(5),
    "encoder_hidden_states": lambda model, config, batch: torch.randn(BATCH, 4, config.hidden_size),
    "cache": lambda model, config, batch: DynamicCache(config=config),
    "past_key_values": lambda model, config, batch: DynamicCache(config=config),
    "output_attentions": lambda model, config, batch: True,
    "output_router_logits": lambda model, config, batch: True,
    "is_causal": lambda model, config, batch: True,
    "cu_seq_lens_q": lambda model, config, batch: torch.tensor([0, SEQ, 2 * SEQ], dtype=torch.int32),
    "cu_seq_lens_k": lambda model, config, batch: torch.tensor([0, SEQ, 2 * SEQ], dtype=torch.int32),
    "max_length_q": lambda model, config, batch: SEQ,
    "max_length_k": lambda model, config, batch: SEQ,
    "seq_idx": lambda model, config, batch: torch.zeros(BATCH * SEQ, dtype=torch.int32),
}


def _parameters(cls) -> list[str]:
    kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return [name for name, p in list(inspect.signature(cls.forward).parameters.items())[1:] if p.kind not in kinds]


def _argument_cases():
    kwargs = list(TransformersKwargs.__annotations__)
    return [(family.model_type, name) for family in FAMILIES
            for name in dict.fromkeys(_parameters(family.base) + kwargs)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_base_forward_parameter_has_a_rule_and_an_example(model_type):
    names = _parameters(family_of_model_type(model_type).base) + list(TransformersKwargs.__annotations__)
    assert [name for name in names if name not in RULES] == [], "give it a rule in fastbert.models.arguments"
    assert [name for name in names if name not in EXAMPLES] == [], "give it an example value in this test"


@pytest.mark.parametrize("model_type,suffix", [(f.model_type, s) for f in FAMILIES for s in f.heads])
def test_every_head_parameter_is_the_heads_own_or_reaches_a_rule(model_type, suffix):
    family = family_of_model_type(model_type)
    unknown = [name for name in _parameters(family.hf_class(suffix)) if name not in RULES and name not in HEAD_ONLY]
    assert unknown == []


def _flat(output):
    """The tensors (and Nones) of a ModelOutput or tuple, nested tuples flattened, in order."""
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    flat = []
    for item in items:
        flat.extend(_flat(item) if isinstance(item, tuple) else [item])
    return flat


def _assert_same_outputs(out, ref, keep):
    assert type(out) is type(ref) or (isinstance(out, tuple) and isinstance(ref, tuple))
    mine, theirs = _flat(out), _flat(ref)
    assert [t is None for t in mine] == [t is None for t in theirs]
    for a, b in zip(mine, theirs):
        if isinstance(b, torch.Tensor):
            assert a.shape == b.shape
            if b.dim() >= 2 and b.shape[:2] == keep.shape:
                a, b = a[keep], b[keep]
            assert max_error(a, b) <= TOL


def _call(model, batch, name, value, encode_calls):
    """(output or the exception raised, whether the fast encoder ran, the warnings)."""
    before = len(encode_calls)
    arguments = dict(batch) if value is None else {**batch, name: copy.deepcopy(value)}  # a cache fills up
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = model(**arguments)
        except Exception as error:  # noqa: BLE001 - compared with transformers' own outcome
            result = error
    fastbert_warnings = [str(w.message) for w in caught if "fastbert" in str(w.message)]
    return result, len(encode_calls) > before, fastbert_warnings


@pytest.fixture
def encode_calls(monkeypatch):
    calls = count_calls(monkeypatch, native, "encode")
    native._warned_reasons.clear()
    return calls


@pytest.mark.parametrize("model_type,name", _argument_cases())
def test_each_argument_matches_transformers_or_falls_back(model_type, name, encode_calls):
    config = family_config(model_type)
    family = family_of_model_type(model_type)
    torch.manual_seed(0)
    reference = family.base(config).eval()
    fast = fastbert.patch(copy.deepcopy(reference))
    batch = family_batch(config, [SEQ, 3], SEQ, "right", torch.Generator().manual_seed(1))
    value = EXAMPLES[name](reference, config, batch)
    assert_matches_or_falls_back(reference, fast, batch, name, value, encode_calls)


def falls_back(name: str, value, base_class: type) -> bool:
    """Whether `name=value` runs transformers' forward by RULES (indices: where transformers reads them otherwise)."""
    if name == "output_hidden_states":
        return not isinstance(value, bool) and not SELECTS_HIDDEN_STATES_BY_INDEX
    return RULES[name] == PLAIN_PATH or (RULES[name] == INPUT and name not in _parameters(base_class))


def assert_matches_or_falls_back(reference, fast, batch, name, value, encode_calls):
    """fast(**batch, name=value) gives transformers' outcome (output or exception type), on the fast path or,
    with one fastbert warning, on transformers' forward, as `falls_back` says."""
    ref, _, _ = _call(reference, batch, name, value, encode_calls)
    out, fast_path, messages = _call(fast, batch, name, value, encode_calls)
    if isinstance(ref, Exception):
        assert type(out) is type(ref), f"transformers raises {ref!r}, fastbert gives {out!r}"
        return
    assert not isinstance(out, Exception), out
    _assert_same_outputs(out, ref, batch["attention_mask"].bool())
    expected = falls_back(name, value, type(reference.base_model))
    assert fast_path is not expected
    assert bool(messages) is expected, messages


def test_distilbert_token_type_ids_fall_back_as_transformers_ignores_them(encode_calls):
    config = family_config("distilbert")
    torch.manual_seed(0)
    reference = family_of_model_type("distilbert").base(config).eval()
    fast = fastbert.patch(copy.deepcopy(reference))
    batch = family_batch(config, [SEQ, 3], SEQ, "right", torch.Generator().manual_seed(1))
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    ref, _, _ = _call(reference, batch, "token_type_ids", types, encode_calls)
    out, fast_path, messages = _call(fast, batch, "token_type_ids", types, encode_calls)
    assert not fast_path and messages == [
        "fastbert: the argument token_type_ids is not on the fast path; running transformers' forward instead"]
    _assert_same_outputs(out, ref, batch["attention_mask"].bool())


@pytest.mark.parametrize("flag,value,call", [
    ("output_attentions", True, {}),
    ("is_causal", True, {}),
    ("return_dict", False, {}),
    ("return_dict", False, {"return_dict": None}),  # an explicit None: a ModelOutput, as transformers
    ("output_hidden_states", True, {"output_hidden_states": None}),  # an explicit None: no hidden states
    pytest.param("output_hidden_states", [1, -1], {}, marks=needs_config_indices),
])
@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_config_defaults_are_read_as_transformers_reads_them(model_type, flag, value, call, encode_calls):
    config = family_config(model_type)
    setattr(config, flag, value)
    torch.manual_seed(0)
    reference = family_of_model_type(model_type).base(config).eval()
    fast = fastbert.patch(copy.deepcopy(reference))
    batch = {**family_batch(config, [SEQ, 3], SEQ, "right", torch.Generator().manual_seed(1)), **call}
    ref, _, _ = _call(reference, batch, flag, None, encode_calls)
    out, fast_path, messages = _call(fast, batch, flag, None, encode_calls)
    _assert_same_outputs(out, ref, batch["attention_mask"].bool())
    assert fast_path is (RULES[flag] != PLAIN_PATH) and bool(messages) is not fast_path


def test_trainers_num_items_in_batch_stays_on_the_fast_path(encode_calls):
    config = family_config("bert")
    torch.manual_seed(0)
    reference = family_of_model_type("bert").hf_class("ForSequenceClassification")(config).eval()
    fast = fastbert.patch(copy.deepcopy(reference))
    batch = {**family_batch(config, [SEQ, 3], SEQ, "right", torch.Generator().manual_seed(1)),
             "labels": torch.tensor([0, 1])}
    ref, _, _ = _call(reference, batch, "num_items_in_batch", torch.tensor(2), encode_calls)
    out, fast_path, messages = _call(fast, batch, "num_items_in_batch", torch.tensor(2), encode_calls)
    assert fast_path and not messages
    assert max_error(out.loss, ref.loss) <= TOL


@pytest.mark.parametrize("name,value", [("head_mask", torch.ones(2, 4)), ("cache_position", torch.arange(SEQ)),
                                        ("an_argument_nobody_knows", 1)])
def test_an_argument_without_a_rule_takes_the_plain_path(name, value, encode_calls):
    """Parameters of older transformers (head_mask), generate's (cache_position) or a typo: transformers
    passes them on unread, fastbert runs transformers' forward and says so."""
    config = family_config("bert")
    torch.manual_seed(0)
    reference = family_of_model_type("bert").base(config).eval()
    fast = fastbert.patch(copy.deepcopy(reference))
    batch = family_batch(config, [SEQ, 3], SEQ, "right", torch.Generator().manual_seed(1))
    ref, _, _ = _call(reference, batch, name, value, encode_calls)
    out, fast_path, messages = _call(fast, batch, name, value, encode_calls)
    assert not fast_path and messages == [
        f"fastbert: the argument {name} is not on the fast path; running transformers' forward instead"]
    _assert_same_outputs(out, ref, batch["attention_mask"].bool())
