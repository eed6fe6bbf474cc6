"""ModernBERT on fastbert's ops: a layer kind with its own program (docs/engineering/internals.md says why).

transformers' ModernBERT runs the padded batch and, on its local layers, a dense (seq x seq) window
mask. Here the mask is read once, the layers run on packed real tokens, and each layer is:

    h = attn_norm(x)                          (Identity on layer 0)
    qkv = Wqkv(h); rotary(qkv)                RoPE on q and k inside the QKV output, per layer type
    x = x + Wo(attention(q, k, v))            global: varlen_attention; local: window_attention
    x = x + mlp.Wo(geglu(mlp.Wi(mlp_norm(x))))

then final_norm and one scatter back to (batch, seq). Every class subclasses transformers' own, so
parameter names, from_pretrained/save_pretrained, Trainer and PEFT behave as in transformers; modules
of classes fastbert does not know, and arguments it does not read, run transformers' forward with one
warning (never silently wrong).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.profiler import record_function
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.modernbert import modeling_modernbert as hf

from fastbert import backend
from fastbert.models import native
from fastbert.models.arguments import (
    argument_reason,
    call_value,
    hidden_state_selection,
    input_names,
    selected_hidden_states,
)
from fastbert.models.encoder import TokenLayout
from fastbert.models.loading import StrictLoading
from fastbert.models.native import FIRST_TOKEN_MARK, key_padding_mask, warn_plain_path, with_signature
from fastbert.models.program import pre_norm
from fastbert.models.support import gelu_approximation, is_elementwise
from fastbert.models.validation import should_validate, validate_inputs
from fastbert.ops.attention import varlen_attention
from fastbert.ops.geglu import geglu
from fastbert.ops.linear import linear as linear_op
from fastbert.ops.padding import has_holes
from fastbert.ops.rotary import RotaryTables, rotary
from fastbert.ops.window_attention import window_attention

_TABLES = RotaryTables()


@dataclass
class PackedTokens(TokenLayout):
    """encoder.TokenLayout (pack, unpack, first_tokens), plus what ModernBERT's layers read: cu_seqlens even
    without padding (the attention ops take packed tokens) and each token's rotary position."""

    positions: torch.Tensor | None = None  # (tokens,) int64 rotary position of each token
    position_limit: int = 0  # the largest position + 1 when position_ids were given
    rotations: dict = field(default_factory=dict)  # inv_freq id -> (cos, sin) rows of the tokens, per forward

    @classmethod
    def build(cls, keep: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int, seqlen: int, device):
        layout = cls.from_mask(keep, batch, seqlen)
        if layout.cu_seqlens is None:
            layout.cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        # transformers' default positions are the column index, padding included (left padding shifts them).
        columns = torch.arange(seqlen, device=device) if position_ids is None else position_ids
        layout.positions = layout.pack(columns.expand(batch, seqlen))
        if position_ids is not None and layout.positions.numel():
            layout.position_limit = int(layout.positions.max()) + 1
        return layout

    def rotation(self, inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (tokens, head_dim // 2) of every token's position, looked up once per forward."""
        key = id(inv_freq)
        if key not in self.rotations:
            length = max(max_positions, self.seqlen, self.position_limit)
            self.rotations[key] = _TABLES.lookup(inv_freq, self.positions, length)
        return self.rotations[key]


# ---- one layer -----------------------------------------------------------------------------------------


def _dense(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain nn.Linear runs on fastbert's linear op (packed oneDNN GEMM for fp32 CPU inference);
    any other Linear-like module (LoRA, quantized) runs its own forward."""
    if type(module) is nn.Linear:
        return linear_op(x, module.weight, module.bias)
    return module(x)


def _dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x) if isinstance(module, nn.Dropout) and module.training and module.p > 0 else x


class LiveModernLayer:
    """The live executor of program.pre_norm for one ModernBERT layer; `call` is the forward's PackedTokens."""

    __slots__ = ("layer", "model")

    def __init__(self, layer: nn.Module, model: nn.Module):
        self.layer, self.model = layer, model

    def attention_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer.attn_norm(hidden)  # Identity on layer 0

    def attention(self, hidden: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
        """attention(rotary(Wqkv(hidden))) on packed tokens: (tokens, hidden) -> context (tokens, hidden)."""
        layer, rotary_emb = self.layer, self.model.rotary_emb
        attn = layer.attn
        heads, head_dim = attn.config.num_attention_heads, attn.head_dim
        qkv = _dense(attn.Wqkv, hidden).view(hidden.shape[0], 3, heads, head_dim)
        inv_freq = getattr(rotary_emb, f"{layer.attention_type}_inv_freq")
        cos, sin = packed.rotation(inv_freq, rotary_emb.max_seq_len_cached)
        q, k, v = rotary(qkv, cos, sin).unbind(dim=1)
        arguments = dict(softmax_scale=head_dim**-0.5, dropout_p=attn.attention_dropout if attn.training else 0.0)
        # Named ranges, so a profile shows local against global attention time (docs/perf-notes.md).
        if layer.attention_type == "sliding_attention":
            with record_function("fastbert::modernbert_local_attention"):
                context = window_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen,
                                           self.model.config.sliding_window, **arguments)
        else:
            with record_function("fastbert::modernbert_global_attention"):
                context = varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, **arguments)
        return context.reshape(hidden.shape[0], heads * head_dim)

    def attention_out(self, context: torch.Tensor) -> torch.Tensor:
        attn = self.layer.attn
        return _dropout(attn.out_drop, _dense(attn.Wo, context))

    def ffn_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer.mlp_norm(hidden)

    def ffn_in(self, hidden: torch.Tensor) -> torch.Tensor:
        """act(input) * gate with [input | gate] = Wi(hidden); one fused geglu for a known GELU."""
        mlp = self.layer.mlp
        both = _dense(mlp.Wi, hidden)
        approximate = gelu_approximation(mlp.act)
        if approximate is not None:
            return geglu(both, approximate)
        values, gate = both.chunk(2, dim=-1)
        return mlp.act(values) * gate

    def ffn_out(self, inner: torch.Tensor) -> torch.Tensor:
        mlp = self.layer.mlp
        return _dense(mlp.Wo, _dropout(mlp.drop, inner))


def layer_forward(layer: nn.Module, hidden: torch.Tensor, packed: PackedTokens, model: nn.Module) -> torch.Tensor:
    """One pre-norm ModernBERT layer on packed tokens (tokens, hidden)."""
    return pre_norm(LiveModernLayer(layer, model), hidden, packed)


@dataclass
class _LayerCall:
    """What a fast layer needs besides the hidden states: the packed layout and its model."""

    packed: PackedTokens
    model: nn.Module


class FastModernBertEncoderLayer(hf.ModernBertEncoderLayer):
    """transformers' layer; called with a _LayerCall it runs the packed fast path. Called as a module
    so hooks and transformers' gradient checkpointing apply; called with a mask it is transformers' layer."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if isinstance(attention_mask, _LayerCall):
            return layer_forward(self, hidden_states, attention_mask.packed, attention_mask.model)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


# ---- which models the fast path may take ---------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm


def _is_dropout(module: nn.Module) -> bool:
    return type(module) in (nn.Dropout, nn.Identity)


def _layer_problem(name: str, layer: nn.Module) -> str | None:
    if type(layer) not in (hf.ModernBertEncoderLayer, FastModernBertEncoderLayer):
        return f"the module {name} of class {type(layer).__name__}"
    attn, mlp = layer.attn, layer.mlp
    parts = {
        "attn_norm": _is_norm(layer.attn_norm) or type(layer.attn_norm) is nn.Identity,
        "mlp_norm": _is_norm(layer.mlp_norm),
        "attn": type(attn) is hf.ModernBertAttention and _is_dropout(attn.out_drop),
        "mlp": type(mlp) is hf.ModernBertMLP and _is_dropout(mlp.drop) and is_elementwise(mlp.act),
    }
    bad = [part for part, known in parts.items() if not known]
    return f"the module {name}.{bad[0]} (a class or activation fastbert does not know)" if bad else None


def _rotary_problem(rotary_emb: nn.Module) -> str | None:
    if type(rotary_emb) is not hf.ModernBertRotaryEmbedding:
        return f"the module rotary_emb of class {type(rotary_emb).__name__}"
    for layer_type in rotary_emb.layer_types:
        kind = rotary_emb.rope_type.get(layer_type)
        if kind != "default" or getattr(rotary_emb, f"{layer_type}_attention_scaling") != 1.0:
            return f"rope_type {kind!r} for {layer_type} (fastbert runs the default rotary embedding)"
    return None


def model_problem(model: nn.Module) -> str | None:
    """Why this ModernBertModel's modules keep it off the fast path, or None."""
    embeddings = model.embeddings
    if not (type(embeddings) is hf.ModernBertEmbeddings and type(embeddings.tok_embeddings) is nn.Embedding
            and _is_norm(embeddings.norm) and _is_dropout(embeddings.drop)):
        return "the module embeddings (a class fastbert does not know)"
    if not _is_norm(model.final_norm):
        return f"the module final_norm of class {type(model.final_norm).__name__}"
    for index, layer in enumerate(model.layers):
        problem = _layer_problem(f"layers.{index}", layer)
        if problem:
            return problem
    return _rotary_problem(model.rotary_emb)


def _keep_mask(mask) -> torch.Tensor | None | str:
    """(batch, seq) keep-mask from a 2-D attention_mask, or why the fast path does not take it. transformers
    applies 4-D masks (and dicts of masks) as given, without the local window, so those run its forward."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return key_padding_mask(mask)
    if isinstance(mask, torch.Tensor):
        return f"a {mask.dim()}-D attention_mask (transformers applies it as given, without the local window)"
    return f"an attention_mask of type {type(mask).__name__}"


def _mask_problem(keep: torch.Tensor | None) -> str | None:
    """Packing keeps distances only when each row's tokens are one contiguous run (left or right padding)."""
    if has_holes(keep):
        return "an attention_mask with holes (padding between tokens: the window and positions count it)"
    return None


# ---- the base model --------------------------------------------------------------------------------------


def encode(model: nn.Module, arguments: dict, keep: torch.Tensor | None) -> BaseModelOutput:
    """Embeddings, layers and final norm of a transformers ModernBertModel on packed tokens."""
    input_ids, inputs_embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
    reference = input_ids if input_ids is not None else inputs_embeds
    batch, seqlen = reference.shape[:2]
    packed = PackedTokens.build(keep, arguments.get("position_ids"), batch, seqlen, reference.device)
    embeddings = model.embeddings
    words = embeddings.tok_embeddings(packed.pack(input_ids)) if input_ids is not None else packed.pack(inputs_embeds)
    hidden = embeddings.drop(embeddings.norm(words))
    selection = hidden_state_selection(model, call_value(model.config, arguments, "output_hidden_states"))
    all_hidden = [packed.unpack(hidden)] if selection is not False else None
    call = _LayerCall(packed, model)
    with backend.training_forward() if model.training else contextlib.nullcontext():
        for layer in model.layers:
            hidden = layer(hidden, call) if isinstance(layer, FastModernBertEncoderLayer) else layer_forward(
                layer, hidden, packed, model)
            if all_hidden is not None:
                all_hidden.append(packed.unpack(hidden))
    hidden = model.final_norm(hidden)
    last = packed.unpack(hidden)
    if model.__dict__.get(FIRST_TOKEN_MARK) and packed.indices is not None:
        last[:, 0] = packed.first_tokens(hidden)
    if all_hidden is not None:  # the last one is transformers' final-normed output
        all_hidden = selected_hidden_states(tuple(all_hidden), selection, last, model.config)
    return BaseModelOutput(last_hidden_state=last, hidden_states=all_hidden)


_ARGUMENT_NAMES = tuple(inspect.signature(hf.ModernBertModel.forward).parameters)[1:]
_INPUT_NAMES = input_names(_ARGUMENT_NAMES)


def plain_path_reason(model: nn.Module, arguments: dict, keep) -> str | None:
    """Why this call (its arguments, mask or the model's modules) runs transformers' forward, or None."""
    reason = argument_reason(model.config, arguments, _INPUT_NAMES) or (keep if isinstance(keep, str) else None)
    return reason or model_problem(model) or _mask_problem(keep)


class FastModernBert:
    """Mixed in before transformers' ModernBertModel: its forward runs the packed fast path."""

    def forward(self, *args, validate=None, **kwargs):
        """ModernBertModel's forward calls this one under transformers' signature (native.with_signature);
        validate (keyword only, in **kwargs) as in fastbert.models.native.FastEncoder.forward."""
        arguments = {**dict(zip(_ARGUMENT_NAMES, args)), **kwargs}
        keep = _keep_mask(arguments.get("attention_mask"))
        reason = plain_path_reason(self, arguments, keep)
        if reason is not None:  # decided before validation: transformers' forward checks its own inputs
            warn_plain_path(reason)
            return super().forward(*args, **kwargs)
        if should_validate(self.config, validate):
            validate_inputs(self.config, self.embeddings.tok_embeddings.weight.device,
                            *(arguments.get(name) for name in ("input_ids", "attention_mask")), None,
                            arguments.get("position_ids"), arguments.get("inputs_embeds"))
        if (arguments.get("input_ids") is None) == (arguments.get("inputs_embeds") is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output = encode(self, arguments, keep)
        # transformers returns a tuple only for return_dict=False (an explicit None means a ModelOutput)
        return output.to_tuple() if call_value(self.config, arguments, "return_dict") is False else output


def _swap_layers(model: nn.Module, to_fast: bool) -> None:
    old, new = ((hf.ModernBertEncoderLayer, FastModernBertEncoderLayer) if to_fast
                else (FastModernBertEncoderLayer, hf.ModernBertEncoderLayer))
    for layer in model.layers:
        if type(layer) is old:
            layer.__class__ = new


# A headless model drops a checkpoint's head weights quietly, as transformers' own does.
_HEAD_KEYS = [r"^head\.", r"^decoder\.", r"^classifier\."]


class ModernBertModel(StrictLoading, FastModernBert, hf.ModernBertModel):
    """transformers.ModernBertModel with fastbert's packed forward (RoPE, GeGLU, windowed local layers)."""

    _keys_to_ignore_on_load_unexpected = _HEAD_KEYS
    forward = with_signature(FastModernBert.forward, hf.ModernBertModel.forward)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _swap_layers(self, to_fast=True)


def reads_first_column(head: nn.Module) -> bool:
    """A head that pools [:, 0] of the padded output itself (transformers' cls pooling)."""
    return isinstance(head, hf.ModernBertForSequenceClassification) and head.config.classifier_pooling == "cls"


# ModernBERT's part in the one class swap (native.LayerKind): patch(), unpatch() and the native heads use it.
native.KINDS.append(native.LayerKind(
    "ModernBERT", native=lambda cls: ModernBertModel if cls is hf.ModernBertModel else None,
    plain=lambda cls: hf.ModernBertModel if issubclass(cls, ModernBertModel) else None,
    swap_layers=lambda model, to_fast: _swap_layers(model, to_fast), reads_first_column=reads_first_column,
))

HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice")
CLASSES: dict[str, type] = {"ModernBertModel": ModernBertModel}
CLASSES.update({f"ModernBert{suffix}": native.native_head_class(getattr(hf, f"ModernBert{suffix}"))
                for suffix in HEADS})
globals().update(CLASSES)


def native_class(suffix: str) -> type:
    """fastbert's ModernBERT class for a transformers suffix ("Model", "ForMaskedLM", ...)."""
    name = "ModernBert" + suffix
    if name not in CLASSES:
        raise ValueError(f"fastbert has no {name}: ModernBERT models have {', '.join(HEADS)} heads")
    return CLASSES[name]
