"""fastbert's BERT models: HuggingFace's classes with the fast encoder forward.

Every class subclasses its transformers counterpart, so the module tree, the parameter names
(`bert.encoder.layer.0.attention.self.query.weight`, ...), from_pretrained/save_pretrained, Trainer,
Accelerate and PEFT behave exactly as with transformers. Only BertModel.forward changes: it runs
fastbert.models.encoder on fused ops, and hands the cases the fast path does not cover (decoder,
cross-attention, KV cache, output_attentions, general 4-D masks) to HuggingFace's own forward with
one warning, so nothing is ever silently wrong.
"""
from __future__ import annotations

import warnings

import torch
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.bert import modeling_bert as hf

from fastbert.models.encoder import FastBertLayer, encode
from fastbert.models.validation import should_validate, validate_inputs

_warned_reasons: set[str] = set()


def _warn_plain_path(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(
            f"fastbert: {reason} is not on the fast path; running HuggingFace's BERT forward instead",
            stacklevel=3,
        )


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None | str:
    """(batch, seq) bool keep-mask from a HuggingFace attention_mask, or a string saying why not.

    Accepts 2-D masks (1/True = token, 0/False = padding) and 4-D masks that broadcast over heads and
    queries, (batch, 1, 1, seq): bool (True = attend) or additive float (0 = attend).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask != 0
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        row = attention_mask[:, 0, 0, :]
        return row if row.dtype == torch.bool else row == 0
    return f"an attention_mask of shape {tuple(attention_mask.shape)} (per-query masks)"


def plain_path_reason(model: hf.BertModel, arguments: dict) -> str | None:
    """Why this call cannot take the fast path, or None if it can."""
    config = model.config
    if config.is_decoder:
        return "a decoder (causal) BertModel"
    if arguments.get("encoder_hidden_states") is not None:
        return "cross-attention (encoder_hidden_states)"
    if arguments.get("past_key_values") is not None or arguments.get("use_cache"):
        return "a key/value cache (past_key_values, use_cache)"
    if arguments.get("output_attentions", getattr(config, "output_attentions", False)):
        return "output_attentions=True"
    return None


class MissingWeightsError(ValueError):
    """A checkpoint lacks weights the model needs, or has weights it cannot place."""


def _check_loading_info(model, info: dict, init_new_head: bool) -> None:
    """Raise unless every weight the model needs came from the checkpoint, with the right shape.

    A headless BertModel drops a checkpoint's head weights quietly (as transformers does). With
    init_new_head=True, task-head weights that are absent or of another shape (another label count)
    are freshly initialized and other heads' weights are dropped: the fine-tuning case. Encoder
    weights must always be there.
    """
    prefix = model.base_model_prefix + "."
    headless = isinstance(model, hf.BertModel)

    def in_encoder(key: str) -> bool:
        return headless or key.startswith(prefix)

    missing = sorted(info.get("missing_keys", ()))
    unexpected = [] if headless else sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(info.get("mismatched_keys", ()))  # (key, checkpoint shape, model shape)
    if init_new_head:
        missing = [k for k in missing if in_encoder(k)]
        unexpected = [k for k in unexpected if k.startswith(prefix)]
        mismatched = [m for m in mismatched if in_encoder(m[0])]
    wrong_shape = [f"{key} {tuple(theirs)} in the checkpoint, {tuple(ours)} in the model" for key, theirs, ours in mismatched]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    if problems:
        hint = "" if init_new_head else " (to fine-tune a new task head, pass init_new_head=True)"
        raise MissingWeightsError(
            f"{type(model).__name__}.from_pretrained: the checkpoint does not fit the model{hint}: "
            + "; ".join(problems)
        )


class _StrictLoading:
    """from_pretrained that refuses missing, unexpected or wrongly shaped weights."""

    @classmethod
    def from_pretrained(cls, *args, init_new_head: bool = False, **kwargs):
        if kwargs.get("trust_remote_code"):
            raise ValueError("fastbert never runs code from a checkpoint: trust_remote_code must be False")
        if kwargs.get("weights_only", True) is not True:
            raise ValueError(
                "fastbert loads checkpoints with safetensors or torch.load(weights_only=True) only: "
                "weights_only=False would let a pickled checkpoint run code"
            )
        want_info = kwargs.pop("output_loading_info", False)
        # transformers raises a RuntimeError that names no weight on a shape mismatch; let it report
        # the mismatch instead, so that _check_loading_info lists it in a MissingWeightsError.
        kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        _check_loading_info(model, info, init_new_head)
        return (model, info) if want_info else model


class BertModel(_StrictLoading, hf.BertModel):
    """transformers.BertModel with fastbert's fused, padding-free forward."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _swap_layer_classes(self, hf.BertLayer, FastBertLayer)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=None,
        validate=None,
        **kwargs,
    ):
        if should_validate(self.config, validate):
            validate_inputs(
                self.config,
                self.embeddings.word_embeddings.weight.device,
                input_ids,
                attention_mask,
                token_type_ids,
                position_ids,
                inputs_embeds,
            )
        arguments = dict(
            encoder_hidden_states=encoder_hidden_states,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=kwargs.get("output_attentions"),
        )
        reason = plain_path_reason(self, arguments)
        keep = key_padding_mask(attention_mask)
        if reason is None and isinstance(keep, str):
            reason = keep
        if reason is not None:
            _warn_plain_path(reason)
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        inputs = dict(
            input_ids=input_ids, inputs_embeds=inputs_embeds, token_type_ids=token_type_ids, position_ids=position_ids
        )
        output_hidden_states = kwargs.get("output_hidden_states")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        result = encode(self, inputs, keep, bool(output_hidden_states))
        pooled = self.pooler(result.first_tokens[:, None]) if self.pooler is not None else None
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=result.last_hidden_state,
            pooler_output=pooled,
            hidden_states=result.hidden_states,
        )
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()


def _register_output_capture(module: torch.nn.Module) -> None:
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


def _swap_layer_classes(module: hf.BertModel, old: type, new: type) -> None:
    for layer in module.encoder.layer:
        if type(layer) is old:
            layer.__class__ = new


def use_fast_forward(module: hf.BertModel) -> None:
    """Give a transformers BertModel instance fastbert's forward (same objects, same weights)."""
    module.__class__ = BertModel
    _swap_layer_classes(module, hf.BertLayer, FastBertLayer)
    _register_output_capture(module)


def use_plain_forward(module: BertModel) -> None:
    """Undo use_fast_forward: transformers' classes again."""
    module.__class__ = hf.BertModel
    _swap_layer_classes(module, FastBertLayer, hf.BertLayer)


def _use_fast_encoder(model: torch.nn.Module) -> None:
    if type(model.bert) is hf.BertModel:
        use_fast_forward(model.bert)


def _with_fast_encoder(hf_class):
    """A fastbert head class: the transformers head whose `bert` runs the fast forward."""

    def __init__(self, config, *args, **kwargs):
        hf_class.__init__(self, config, *args, **kwargs)
        _use_fast_encoder(self)

    doc = f"transformers.{hf_class.__name__} whose encoder runs fastbert's fused, padding-free forward."
    return type(hf_class.__name__, (_StrictLoading, hf_class), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


BertForPreTraining = _with_fast_encoder(hf.BertForPreTraining)
BertForMaskedLM = _with_fast_encoder(hf.BertForMaskedLM)
BertForNextSentencePrediction = _with_fast_encoder(hf.BertForNextSentencePrediction)
BertForSequenceClassification = _with_fast_encoder(hf.BertForSequenceClassification)
BertForTokenClassification = _with_fast_encoder(hf.BertForTokenClassification)
BertForQuestionAnswering = _with_fast_encoder(hf.BertForQuestionAnswering)
BertForMultipleChoice = _with_fast_encoder(hf.BertForMultipleChoice)

HEAD_CLASSES = (
    BertForPreTraining,
    BertForMaskedLM,
    BertForNextSentencePrediction,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertForQuestionAnswering,
    BertForMultipleChoice,
)
