"""The fast BERT forward, written against HuggingFace's module tree.

These functions read the parameters of HuggingFace-structured modules (BertEmbeddings, BertLayer,
BertPooler, with HF's attribute names) and run them on fastbert's fused ops. The native
fastbert.BertModel and fastbert.patch() both use them, so there is one fast path.

Padding is removed once, right after the mask is read (even the embedding lookups skip padding),
the layers run on packed tokens described by cu_seqlens/max_seqlen, and padding is restored once at
the end. A batch without padding stays in its dense (batch, seq) layout and skips the gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert import modeling_bert as hf

from fastbert import backend
from fastbert.ops import add_layer_norm, attention, bias_gelu, varlen_attention
from fastbert.ops.padding import packing_from_mask

# config.hidden_act -> bias_gelu's `approximate`; other activations run through the module's own.
GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class TokenLayout:
    """Where the real tokens of a (batch, seq) batch live in the packed (tokens, ...) layout."""

    batch: int
    seqlen: int
    indices: torch.Tensor | None  # (tokens,) rows of batch*seq that are real; None = no padding
    cu_seqlens: torch.Tensor | None  # (batch+1,) int32
    max_seqlen: int

    @classmethod
    def from_mask(cls, keep: torch.Tensor | None, batch: int, seqlen: int) -> "TokenLayout":
        if keep is None:
            return cls(batch, seqlen, None, None, seqlen)
        indices, cu_seqlens, max_seqlen, total = packing_from_mask(keep)
        if total == batch * seqlen:
            return cls(batch, seqlen, None, None, seqlen)
        return cls(batch, seqlen, indices, cu_seqlens, max_seqlen)

    @property
    def dense(self) -> bool:
        return self.indices is None

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (tokens, ...)."""
        flat = padded.reshape(self.batch * self.seqlen, *padded.shape[2:])
        return flat if self.dense else flat.index_select(0, self.indices)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (batch, seq, ...), zeros at padding."""
        rest = packed.shape[1:]
        if self.dense:
            return packed.view(self.batch, self.seqlen, *rest)
        padded = packed.new_zeros(self.batch * self.seqlen, *rest)
        return padded.index_copy(0, self.indices, packed).view(self.batch, self.seqlen, *rest)

    def first_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """(batch, hidden): each sequence's first real token ([CLS]); zeros for empty sequences."""
        if self.dense:
            if self.seqlen == 0:
                return packed.new_zeros(self.batch, packed.shape[-1])
            return packed.view(self.batch, self.seqlen, packed.shape[-1])[:, 0]
        if packed.shape[0] == 0:
            return packed.new_zeros(self.batch, packed.shape[-1])
        starts = self.cu_seqlens[:-1].long().clamp(max=packed.shape[0] - 1)
        nonempty = (self.cu_seqlens[1:] > self.cu_seqlens[:-1])[:, None]
        return torch.where(nonempty, packed.index_select(0, starts), torch.zeros((), dtype=packed.dtype))


def linear_for_fusion(linear: nn.Module, x: torch.Tensor, fused_op: str):
    """Run `linear` on x, leaving its bias to the following fused op when that op can take it.

    Returns (y, bias or None). The bias is split off only for a plain nn.Linear (a LoRA or quantized
    wrapper runs whole) and only when `fused_op` runs on a fused backend: PyTorch's own addmm adds
    the bias for free, so on the torch backend it stays in the GEMM.
    """
    if type(linear) is nn.Linear and linear.bias is not None and backend.resolve(fused_op, x) != "torch":
        return F.linear(x, linear.weight), linear.bias
    return linear(x), None


def _dropout_p(module: nn.Module) -> float:
    return module.p if module.training else 0.0


def _fused_qkv_parameters(self_attention: nn.Module):
    """One (3*hidden, hidden) weight and bias from the separate query/key/value Linears.

    PEFT targets query/key/value by name, so the modules stay separate and are fused here, at run
    time. Without autograd the fused copy is cached until a parameter is replaced or changes
    (identity and version counter; the entry holds the parameters, so no address is ever reused).
    """
    linears = (self_attention.query, self_attention.key, self_attention.value)
    params = tuple(p for lin in linears for p in (lin.weight, lin.bias))
    caching = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if caching:
        versions = tuple(p._version for p in params)
        cached = getattr(self_attention, "_fastbert_qkv_cache", None)
        if cached is not None and cached[1] == versions and all(a is b for a, b in zip(cached[0], params)):
            return cached[2], cached[3]
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears])
    if caching:
        self_attention._fastbert_qkv_cache = (params, versions, weight, bias)  # one assignment: thread-safe
    return weight, bias


def _project_qkv(self_attention: nn.Module, hidden: torch.Tensor):
    """query, key, value projections of (tokens, hidden), each (tokens, heads * head_dim)."""
    linears = (self_attention.query, self_attention.key, self_attention.value)
    if all(type(lin) is nn.Linear and lin.bias is not None for lin in linears):
        weight, bias = _fused_qkv_parameters(self_attention)
        return F.linear(hidden, weight, bias).chunk(3, dim=-1)
    return tuple(lin(hidden) for lin in linears)


def self_attention_forward(self_attention: nn.Module, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """BertSelfAttention on packed tokens: (tokens, hidden) -> context (tokens, heads * head_dim)."""
    heads, head_dim = self_attention.num_attention_heads, self_attention.attention_head_size
    scale = getattr(self_attention, "scaling", head_dim**-0.5)
    dropout_p = _dropout_p(self_attention.dropout)
    q, k, v = _project_qkv(self_attention, hidden)
    tokens = hidden.shape[0]
    if layout.dense:
        def split_heads(t):
            return t.view(layout.batch, layout.seqlen, heads, head_dim).transpose(1, 2)

        context = attention(split_heads(q), split_heads(k), split_heads(v), softmax_scale=scale, dropout_p=dropout_p)
        return context.transpose(1, 2).reshape(tokens, heads * head_dim)
    q, k, v = (t.view(tokens, heads, head_dim) for t in (q, k, v))
    context = varlen_attention(
        q, k, v, layout.cu_seqlens, layout.max_seqlen, softmax_scale=scale, dropout_p=dropout_p
    )
    return context.reshape(tokens, heads * head_dim)


def dense_add_layer_norm(output: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(x)) + residual) with bias, dropout,
    residual and LayerNorm in one fused op."""
    y, y_bias = linear_for_fusion(output.dense, x, "add_layer_norm")
    norm = output.LayerNorm
    return add_layer_norm(
        y, residual, norm.weight, norm.bias, norm.eps, x_bias=y_bias, dropout_p=_dropout_p(output.dropout)
    )


def intermediate_forward(intermediate: nn.Module, x: torch.Tensor, approximate: str | None) -> torch.Tensor:
    """BertIntermediate: activation(dense(x)), bias+GELU fused when the activation is a GELU."""
    if approximate is None:
        return intermediate.intermediate_act_fn(intermediate.dense(x))
    y, y_bias = linear_for_fusion(intermediate.dense, x, "bias_gelu")
    return bias_gelu(y, y_bias, approximate)


def layer_forward(layer: nn.Module, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """One BertLayer on packed tokens (tokens, hidden)."""
    hidden_act = layer.attention.self.config.hidden_act
    approximate = GELU_APPROXIMATION.get(hidden_act) if isinstance(hidden_act, str) else None
    context = self_attention_forward(layer.attention.self, hidden, layout)
    hidden = dense_add_layer_norm(layer.attention.output, context, hidden)
    inner = intermediate_forward(layer.intermediate, hidden, approximate)
    return dense_add_layer_norm(layer.output, inner, hidden)


class FastBertLayer(hf.BertLayer):
    """transformers.BertLayer that runs layer_forward when called with a TokenLayout.

    The encoder calls each layer as a module, `layer(hidden, layout)`, so that module hooks run
    (FSDP's per-layer unsharding, Accelerate's offloading, user hooks) and transformers' gradient
    checkpointing wraps the layer as it wraps its own. Called with a mask, it is HF's layer.
    """

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if isinstance(attention_mask, TokenLayout):
            return layer_forward(self, hidden_states, attention_mask)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    if isinstance(layer, FastBertLayer):
        return layer(hidden, layout)
    # A layer whose class fastbert did not set (e.g. wrapped by FSDP before patching): no hooks.
    return layer_forward(layer, hidden, layout)


def embeddings_forward(embeddings: nn.Module, inputs: dict, layout: TokenLayout) -> torch.Tensor:
    """BertEmbeddings on the real tokens only: (tokens, hidden).

    `inputs` holds input_ids or inputs_embeds, token_type_ids and position_ids, each (batch, seq)
    (or None). Positions default to the column index, as in HuggingFace, left padding included.
    """
    batch, seqlen = layout.batch, layout.seqlen
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = embeddings.position_ids[:, :seqlen]
    token_type_ids = inputs.get("token_type_ids")
    if token_type_ids is None:
        token_type_ids = torch.zeros((), dtype=torch.long, device=position_ids.device)
    position_ids = position_ids.expand(batch, seqlen)
    token_type_ids = token_type_ids.expand(batch, seqlen)
    if inputs.get("input_ids") is not None:
        words = embeddings.word_embeddings(layout.pack(inputs["input_ids"]))
    else:
        words = layout.pack(inputs["inputs_embeds"])
    words_and_types = words + embeddings.token_type_embeddings(layout.pack(token_type_ids))
    positions = embeddings.position_embeddings(layout.pack(position_ids))
    norm = embeddings.LayerNorm
    hidden = add_layer_norm(words_and_types, positions, norm.weight, norm.bias, norm.eps)
    return F.dropout(hidden, p=embeddings.dropout.p, training=embeddings.training)


@dataclass
class EncoderResult:
    last_hidden_state: torch.Tensor  # (batch, seq, hidden), zeros at padding
    first_tokens: torch.Tensor  # (batch, hidden): each sequence's first real token, for the pooler
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings + each layer, padded, if asked


def encode(bert: nn.Module, inputs: dict, keep: torch.Tensor | None, output_hidden_states: bool) -> EncoderResult:
    """Embeddings + every layer of a HuggingFace-structured BertModel on the fast path.

    keep: (batch, seq) bool key-padding mask (True = real token) or None for no padding.
    """
    reference = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
    batch, seqlen = reference.shape[:2]
    layout = TokenLayout.from_mask(keep, batch, seqlen)
    hidden = embeddings_forward(bert.embeddings, inputs, layout)
    all_hidden = [layout.unpack(hidden)] if output_hidden_states else None
    for layer in bert.encoder.layer:
        hidden = _run_layer(layer, hidden, layout)
        if all_hidden is not None:
            all_hidden.append(layout.unpack(hidden))
    return EncoderResult(
        last_hidden_state=all_hidden[-1] if all_hidden else layout.unpack(hidden),
        first_tokens=layout.first_tokens(hidden),
        hidden_states=tuple(all_hidden) if all_hidden else None,
    )
