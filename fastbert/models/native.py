"""fastbert's native classes, built from the family table: transformers' classes with the fast forward.

Every class subclasses its transformers counterpart, so the module tree, the parameter names,
from_pretrained/save_pretrained, Trainer, Accelerate and PEFT behave exactly as with transformers.
Only the base model's forward changes: it runs fastbert.models.encoder on fused ops, and hands what
the fast path does not cover (decoder, cross-attention, KV cache, output_attentions, per-query
masks, modules of classes fastbert does not know) to transformers' own forward with one warning,
so nothing is ever silently wrong (fastbert.models.arguments says how each argument is treated). The
decision to fall back comes first; only a call that stays on the fast path is validated. The
generated forward keeps transformers' signature. A head class is the transformers head whose base model gets the
fast class (a subclass that adds no state, so the swap is a pointer change).
"""
from __future__ import annotations

import functools
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastbert.models import arguments as rules
from fastbert.models.encoder import encode, fast_layer_class
from fastbert.models.families import FAMILIES, Family, family_of_base
from fastbert.models.loading import StrictLoading
from fastbert.models.support import check_modules
from fastbert.models.validation import should_validate, validate_inputs
from fastbert.ops.padding import has_holes

_warned_reasons: set[str] = set()

# Set on a base model whose head reads [:, 0] of the padded output itself (see encoder.encode).
FIRST_TOKEN_MARK = "_fastbert_first_token_at_column_0"


def warn_plain_path(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(
            f"fastbert: {reason} is not on the fast path; running transformers' forward instead", stacklevel=4
        )


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None | str:
    """(batch, seq) bool keep-mask from a HuggingFace attention_mask, or a string saying why not.

    Accepts 2-D masks (1/True = token, 0/False = padding) and 4-D masks that broadcast over heads and
    queries, (batch, 1, 1, seq): bool (True = attend) or additive float (0 = attend).
    """
    if attention_mask is None:
        return None
    reason = mask_reason(attention_mask)
    if reason is not None:
        return reason
    if attention_mask.dim() == 2:
        return attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask != 0
    row = attention_mask[:, 0, 0, :]
    return row if row.dtype == torch.bool else row == 0


def mask_reason(attention_mask) -> str | None:
    """Why this mask's shape keeps the call off the fast path (metadata only), or None."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() == 2:
        return None  # no mask, a padding mask, or not a tensor (validation names it)
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        return None
    return f"an attention_mask of shape {tuple(attention_mask.shape)} (per-query masks)"


def relative_mask_reason(family: Family, attention_mask) -> str | None:
    """Relative-position terms count columns: packing a mask with holes would shorten the distances."""
    if family.relative is None or not isinstance(attention_mask, torch.Tensor):
        return None
    if has_holes(key_padding_mask(attention_mask)):
        return "an attention_mask with holes (padding between tokens: the relative positions count it)"
    return None


def relative_problem(family: Family, model: nn.Module, arguments: dict) -> str | None:
    """The relative-position hook's own reason (a config or mask its terms do not cover), if it has one."""
    problem = getattr(family.relative, "problem", None)
    return None if problem is None else problem(model, arguments)


def unread_inputs(model: nn.Module) -> frozenset:
    """Inputs the model's embeddings ignore (Family.unread): neither validated nor read, as in transformers."""
    unread = model._fastbert_family.unread
    return frozenset() if unread is None else unread(model)


def plain_path_reason(model: nn.Module, arguments: dict) -> str | None:
    """Why this call's arguments or config keep it off the fast path, or None (modules: check_modules)."""
    config = model.config
    if getattr(config, "is_decoder", False):
        return f"a decoder (causal) {type(model).__name__}"
    if arguments.get("encoder_hidden_states") is not None:
        return "cross-attention (encoder_hidden_states)"
    if arguments.get("cache") is not None or arguments.get("past_key_values") is not None:
        return "a key/value cache (cache, past_key_values)"
    return rules.argument_reason(config, arguments, model._fastbert_input_names) or mask_reason(
        arguments.get("attention_mask"))


def _validate(model: nn.Module, arguments: dict) -> None:
    config, family = model.config, model._fastbert_family
    validate_inputs(
        config,
        model.get_input_embeddings().weight.device,
        *(arguments.get(name) for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")),
        arguments.get("inputs_embeds"),
        position_offset=family.first_position(config),
        embedding_width=getattr(config, "embedding_size", None),
        length_limit="position_ids" not in unread_inputs(model),
    )


class FastEncoder:
    """Mixed in before a transformers base model class: its forward runs the fast encoder."""

    _fastbert_family: Family
    _fastbert_argument_names: tuple[str, ...]  # transformers' forward parameters, in positional order
    _fastbert_input_names: frozenset[str]  # those the encoder reads (fastbert.models.arguments.INPUT)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        swap_layer_classes(self, to_fast=True)

    def forward(self, *args, validate=None, **kwargs):
        """The generated classes' forward calls this one under transformers' signature (see with_signature).

        validate (keyword only, not in the signature: it travels in **kwargs): True/False runs or skips
        input validation for this call, None follows config.fastbert_validate (default True).
        """
        arguments = {**dict(zip(self._fastbert_argument_names, args)), **kwargs}
        reason = plain_path_reason(self, arguments)
        if reason is None:
            family = self._fastbert_family
            check = check_modules(family, self, (family.layer, fast_layer_class(family)))
            reason = (check.problem or relative_problem(family, self, arguments)
                      or relative_mask_reason(family, arguments.get("attention_mask")))
        if reason is not None:  # decided before validation: transformers' forward checks its own inputs
            warn_plain_path(reason)
            return super().forward(*args, **kwargs)
        unread = unread_inputs(self)
        if unread:
            arguments = {name: value for name, value in arguments.items() if name not in unread}
        if should_validate(self.config, validate):
            _validate(self, arguments)
        return self._fast_forward(arguments, key_padding_mask(arguments.get("attention_mask")), check.views)

    def _fast_forward(self, arguments: dict, keep, views: dict):
        if (arguments.get("input_ids") is None) == (arguments.get("inputs_embeds") is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        family = self._fastbert_family
        names = ("input_ids", "inputs_embeds", "token_type_ids", "position_ids")
        inputs = {name: arguments.get(name) for name in names}
        config = self.config
        selection = rules.hidden_state_selection(self, rules.call_value(config, arguments, "output_hidden_states"))
        options = {
            "output_hidden_states": selection is not False,
            "first_token_at_column_0": self.__dict__.get(FIRST_TOKEN_MARK, False),
        }
        result = encode(self, family, inputs, keep, options, views)
        hidden_states = result.hidden_states
        if hidden_states is not None:
            hidden_states = rules.selected_hidden_states(hidden_states, selection, result.last_hidden_state, config)
        fields = {"last_hidden_state": result.last_hidden_state, "hidden_states": hidden_states}
        if "pooler_output" in family.output_class.__dataclass_fields__:
            pooled = result.pooled  # computed by the inference plan, else the pooler module runs here
            fields["pooler_output"] = pooled if pooled is not None else family.pool(self, result.first_tokens)
        output = family.output_class(**fields)
        # transformers returns a tuple only for return_dict=False (an explicit None means a ModelOutput)
        return output.to_tuple() if rules.call_value(config, arguments, "return_dict") is False else output


def with_signature(implementation, transformers_forward):
    """A `forward` for a generated class: runs `implementation`, and reads as transformers' forward to
    inspect.signature (Trainer's remove_unused_columns, generate's argument checks), help() and tools."""
    def forward(self, *args, **kwargs):
        return implementation(self, *args, **kwargs)

    functools.update_wrapper(forward, transformers_forward, assigned=("__module__", "__name__", "__doc__"), updated=())
    forward.__qualname__ = transformers_forward.__qualname__
    forward.__signature__ = inspect.signature(transformers_forward)
    return forward


def swap_layer_classes(model: nn.Module, to_fast: bool) -> None:
    family = model._fastbert_family
    hf_class, fast_class = family.layer, fast_layer_class(family)
    old, new = (hf_class, fast_class) if to_fast else (fast_class, hf_class)
    for layer in family.schedule(model):
        if type(layer) is old:
            layer.__class__ = new


def _register_output_capture(module: nn.Module) -> None:
    """Let HF's output capturing (output_attentions/output_hidden_states on the plain path) see the new class.

    transformers >= 5 keys the `_can_record_outputs` registry by module, filled in post_init; a
    module whose class was swapped afterwards would otherwise silently return None there.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # other transformers versions: try the older home, else there is nothing to do
        try:
            from transformers.utils.generic import _CAN_RECORD_REGISTRY
        except ImportError:
            return
    _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


_NATIVE_BASES: dict[type, type] = {}  # transformers base model class -> fastbert's


def _register(cls: type) -> type:
    """Make a generated class importable by name (pickle and torch.save look classes up by name)."""
    setattr(sys.modules[__name__], cls.__name__, cls)
    return cls


def native_base_class(family: Family) -> type:
    if family.base not in _NATIVE_BASES:
        names = tuple(inspect.signature(family.base.forward).parameters)[1:]
        attributes = {
            "_fastbert_family": family,
            "_fastbert_argument_names": names,
            "_fastbert_input_names": rules.input_names(names),
            "forward": with_signature(FastEncoder.forward, family.base.forward),
            "__module__": __name__,
            "__doc__": f"transformers.{family.base.__name__} with fastbert's fused, padding-free forward.",
        }
        cls = type(family.base.__name__, (StrictLoading, FastEncoder, family.base), attributes)
        _NATIVE_BASES[family.base] = _register(cls)
    return _NATIVE_BASES[family.base]


@dataclass(frozen=True)
class LayerKind:
    """One layer type's part in the class swap that patch() and the native heads make: the BERT family table,
    and ModernBERT (fastbert/models/modernbert.py registers its own). One swap, mark and unpatch for both."""

    name: str
    native: Callable[[type], type | None]  # an exact transformers base class -> fastbert's; None: not this kind
    plain: Callable[[type], type | None]  # fastbert's base class -> transformers'; None: not this kind
    swap_layers: Callable[[nn.Module, bool], None]  # (base model, to_fast)
    reads_first_column: Callable[[nn.Module], bool]  # a head that reads [:, 0] of the padded output itself


def _table_native(cls: type) -> type | None:
    family = family_of_base(cls)
    return None if family is None else native_base_class(family)


def _table_first_column(head: nn.Module) -> bool:
    return any(isinstance(head, family.hf_class(suffix)) for family in FAMILIES for suffix in family.first_token_heads)


KINDS: list[LayerKind] = [LayerKind(
    "the BERT family table", native=_table_native,
    plain=lambda cls: cls._fastbert_family.base if issubclass(cls, FastEncoder) else None,
    swap_layers=lambda model, to_fast: swap_layer_classes(model, to_fast), reads_first_column=_table_first_column,
)]


def native_of(cls: type) -> type | None:
    """fastbert's class for an exact transformers base model class of any layer kind; None if none takes it."""
    return next((native for kind in KINDS if (native := kind.native(cls)) is not None), None)


def plain_of(cls: type) -> type | None:
    """transformers' class for fastbert's base model class of any layer kind; None for any other class."""
    return next((plain for kind in KINDS if (plain := kind.plain(cls)) is not None), None)


def use_fast_forward(module: nn.Module, first_token_at_column_0: bool = False) -> None:
    """Give a transformers base model instance fastbert's forward (same objects, same weights)."""
    kind = next(kind for kind in KINDS if kind.native(type(module)) is not None)
    module.__class__ = kind.native(type(module))
    kind.swap_layers(module, True)
    _register_output_capture(module)
    if first_token_at_column_0:
        module.__dict__[FIRST_TOKEN_MARK] = True


def use_plain_forward(module: nn.Module) -> None:
    """Undo use_fast_forward: transformers' classes again."""
    kind = next(kind for kind in KINDS if kind.plain(type(module)) is not None)
    kind.swap_layers(module, False)
    module.__class__ = kind.plain(type(module))
    module.__dict__.pop(FIRST_TOKEN_MARK, None)


def reads_first_column(head: nn.Module) -> bool:
    """True for a head that reads [:, 0] of its base model's padded output itself."""
    return any(kind.reads_first_column(head) for kind in KINDS)


def native_head_class(hf_head: type, extra_bases: tuple[type, ...] = ()) -> type:
    """A fastbert head class: the transformers head whose base model runs the fast forward.

    extra_bases are mixed in first (e.g. a head that computes its loss on masked positions only).
    """
    def __init__(self, config, *args, **kwargs):
        super(cls, self).__init__(config, *args, **kwargs)
        base = getattr(self, self.base_model_prefix)
        if native_of(type(base)) is not None:
            use_fast_forward(base, first_token_at_column_0=reads_first_column(self))

    doc = f"transformers.{hf_head.__name__} whose encoder runs fastbert's fused, padding-free forward."
    attributes = {"__init__": __init__, "__doc__": doc, "__module__": __name__}
    own_forward = next((base.__dict__["forward"] for base in extra_bases if "forward" in base.__dict__), None)
    if own_forward is not None:  # a mixin's forward still reads as transformers' to inspect.signature
        attributes["forward"] = with_signature(own_forward, hf_head.forward)
    cls = type(hf_head.__name__, (*extra_bases, StrictLoading, hf_head), attributes)
    return _register(cls)
