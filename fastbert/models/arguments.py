"""How the fast forward treats each argument of transformers' base model forward: matched or fallen back.

Every parameter of a family's `forward` (inspect.signature of the transformers class) and every key
of transformers' `TransformersKwargs` has one rule in `RULES`:
- "input": read by the fast encoder (only where the family's signature names it);
- "output option": reproduced as transformers' `capture_outputs` reads it (see `hidden_state_selection`);
- "unread": transformers' own encoder does not read it either (a cache flag without a cache, the
  cross-attention mask of a model that has no cross-attention, the head's loss argument);
- "plain path": with a value (not None, not False), the call runs transformers' forward.
An argument with no rule (a future transformers parameter, a typo'd keyword) takes the plain path
too, so nothing is ever silently ignored; tests/dropin/test_forward_arguments.py fails until a new
parameter of a transformers release is given a rule here.
"""
from __future__ import annotations

INPUT, OUTPUT_OPTION, UNREAD, PLAIN_PATH = "input", "output option", "unread", "plain path"

RULES: dict[str, str] = {
    "input_ids": INPUT,
    "attention_mask": INPUT,
    "token_type_ids": INPUT,
    "position_ids": INPUT,
    "inputs_embeds": INPUT,
    "output_hidden_states": OUTPUT_OPTION,
    "return_dict": OUTPUT_OPTION,
    # transformers' encoders force use_cache=False and have no cross-attention (decoders take the plain path)
    "use_cache": UNREAD,
    "encoder_attention_mask": UNREAD,
    "num_items_in_batch": UNREAD,  # Trainer passes it to the head's loss; the heads hand it on, unread
    "encoder_hidden_states": PLAIN_PATH,
    "cache": PLAIN_PATH,
    "past_key_values": PLAIN_PATH,  # the deprecated name of `cache`
    "output_attentions": PLAIN_PATH,
    "output_router_logits": PLAIN_PATH,
    "is_causal": PLAIN_PATH,
    # flash-attention's packed-sequence arguments: attention across the packed sequences' borders changes
    "cu_seq_lens_q": PLAIN_PATH,
    "cu_seq_lens_k": PLAIN_PATH,
    "max_length_q": PLAIN_PATH,
    "max_length_k": PLAIN_PATH,
    "seq_idx": PLAIN_PATH,
}

# Arguments whose default comes from the config when the call does not pass them (transformers' rule).
_CONFIG_DEFAULTS = {"output_attentions": False, "is_causal": None, "output_hidden_states": False, "return_dict": True}


def input_names(names) -> frozenset:
    """Those of a forward's parameter names that the fast path reads as inputs (RULES: INPUT)."""
    return frozenset(name for name in names if RULES.get(name) == INPUT)


def call_value(config, arguments: dict, name: str):
    """The value transformers reads: the call's argument if passed (even None), else the config's."""
    return arguments[name] if name in arguments else getattr(config, name, _CONFIG_DEFAULTS[name])


def _has_value(value) -> bool:
    return value is not None and value is not False


def argument_reason(config, arguments: dict, input_names: frozenset) -> str | None:
    """The first argument that needs transformers' forward, as a phrase for the warning; None: none does.

    input_names: the family's parameters the encoder reads (DistilBERT has no token_type_ids).
    """
    for name in ("output_attentions", "is_causal"):
        if call_value(config, arguments, name):
            return f"{name}={call_value(config, arguments, name)!r}"
    if not _selection_understood(call_value(config, arguments, "output_hidden_states")):
        return f"output_hidden_states={call_value(config, arguments, 'output_hidden_states')!r}"
    for name, value in arguments.items():
        rule = RULES.get(name)
        understood = name in input_names if rule == INPUT else rule in (OUTPUT_OPTION, UNREAD)
        if not understood and _has_value(value):
            return f"the argument {name}"
    return None


def _selection_understood(value) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if not SELECTS_HIDDEN_STATES_BY_INDEX:  # older transformers reads indices its own way: run its forward
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _selects_hidden_states_by_index() -> bool:
    """Whether the installed transformers reads output_hidden_states=int/list as hidden_state_selection does
    (indices into the layers + 1 hidden states, negative ones resolved: transformers 5.24 has it, 5.17 counts
    layers without the embeddings' output and no negatives). Detected by its resolver; without it, indices
    take the plain path (tests/dropin/test_dropin_bugs.py fences this)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return False
    return hasattr(output_capturing, "resolve_hidden_states_indices")


SELECTS_HIDDEN_STATES_BY_INDEX = _selects_hidden_states_by_index()


def hidden_state_selection(model, value) -> frozenset | bool:
    """Which hidden states `output_hidden_states=value` asks for, as transformers' capture_outputs reads it.

    False: none (any falsy value, 0 and [] included); True: all; else the indices into the
    (layers + 1) hidden states, negative ones counted from the end, out-of-range ones dropped.
    """
    if not value:
        return False
    if isinstance(value, bool) or not _records_hidden_states(model):
        return True
    indices = [value] if isinstance(value, int) else list(value)
    count = _hidden_state_count(model)
    return frozenset(i % count for i in indices if -count <= i < count)


def _records_hidden_states(model) -> bool:
    """Whether transformers' forward reads output_hidden_states through capture_outputs (indices select);
    MPNet's own forward reads any truthy value as True."""
    return "hidden_states" in (getattr(type(model), "_can_record_outputs", None) or {})


def _hidden_state_count(model) -> int:
    """config.num_hidden_layers + 1 (the embeddings' output), or the recorder's own layer-count key."""
    recorder = getattr(type(model), "_can_record_outputs", {}).get("hidden_states")
    key = getattr(recorder, "num_hidden_layers_key", "num_hidden_layers")
    return getattr(model.config, key) + int(getattr(recorder, "capture_initial_hidden_state", True))


def selected_hidden_states(states: tuple, selection: frozenset | bool, last_hidden_state, config) -> tuple:
    """All the hidden states -> those selected, None elsewhere; the last one is last_hidden_state itself
    when selected (transformers ties them unless config.tie_last_hidden_states is False)."""
    if selection is not True:
        states = tuple(state if i in selection else None for i, state in enumerate(states))
    if states and states[-1] is not None and getattr(config, "tie_last_hidden_states", None) is not False:
        states = (*states[:-1], last_hidden_state)
    return states

