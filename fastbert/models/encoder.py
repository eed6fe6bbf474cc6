"""The one fast encoder forward, for every family in fastbert.models.families.

These functions read the parameters of transformers' modules (found through the family's attribute
paths) and run them on fastbert's fused ops. The native classes and fastbert.patch() both use them.

Padding is removed once, right after the mask is read (even the embedding lookups skip padding),
the layers run on packed tokens described by cu_seqlens/max_seqlen, and padding is restored once at
the end. A batch without padding stays in its dense (batch, seq) layout and skips the gather.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import backend
from fastbert.models import fused_qkv, plan, support
from fastbert.models.embed import EmbeddingSteps, embed
from fastbert.models.families import Family
from fastbert.models.support import embeddings_known, gelu_approximation
from fastbert.ops import add_layer_norm, attention, bias_gelu, qkv_attention, varlen_attention
from fastbert.ops.linear import GELU_ACTIVATION, fuses_epilogue, fuses_gelu, splits_bias
from fastbert.ops.linear import linear as linear_op
from fastbert.ops.padding import counts_from_mask, gather_rows, packing_from_counts, pad_input
from fastbert.ops.relative_attention import relative_attention


@dataclass
class TokenLayout:
    """Where the real tokens of a (batch, seq) batch live in the packed (tokens, ...) layout."""

    batch: int
    seqlen: int
    indices: torch.Tensor | None  # (tokens,) rows of batch*seq that are real; None = no padding
    cu_seqlens: torch.Tensor | None  # (batch+1,) int32
    max_seqlen: int
    # Each layer's modules as this forward's check saw them (support.check_modules), so the layers
    # run exactly what was checked and the module tree is walked once per call.
    views: dict = dataclasses.field(default_factory=dict)
    # This forward trains (the model's mode, decided once per forward by encode): every op call of the
    # layers counts as recorded by autograd, even under no_grad (reentrant checkpointing's first pass).
    training: bool = False
    # (family.relative, what its prepare returned) for a family with relative-position terms, else None
    # (fastbert.models.relative): set once per forward, read by every layer's self-attention.
    relative: tuple | None = None
    # The inputs came packed (encode_packed): one (1, tokens) row, so batch and seqlen are that row's shape
    # and pack/unpack are views, while attention and first_tokens read the sequences from cu_seqlens.
    packed_inputs: bool = False

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int, tokens: int) -> "TokenLayout":
        return cls(1, tokens, None, cu_seqlens, max_seqlen, packed_inputs=True)

    @classmethod
    def from_mask(cls, keep: torch.Tensor | None, batch: int, seqlen: int) -> "TokenLayout":
        if keep is None:
            return cls(batch, seqlen, None, None, seqlen)
        lengths, max_seqlen, total = counts_from_mask(keep)
        if total == batch * seqlen:  # no padding: no gather index (batch-1 requests, mostly)
            return cls(batch, seqlen, None, None, seqlen)
        indices, cu_seqlens = packing_from_counts(keep, lengths, total)
        return cls(batch, seqlen, indices, cu_seqlens, max_seqlen)

    @property
    def dense(self) -> bool:
        return self.indices is None and not self.packed_inputs

    def offsets(self, device: torch.device) -> torch.Tensor:
        """cu_seqlens, also for a dense batch (batch sequences of seqlen tokens)."""
        if not self.dense:
            return self.cu_seqlens
        positions = torch.arange(self.batch + 1, dtype=torch.int32, device=device)
        return positions * self.seqlen  # (seqlen 0: all zeros; arange's step would be 0)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (tokens, ...)."""
        if self.indices is None:
            return padded.reshape(self.batch * self.seqlen, *padded.shape[2:])
        return gather_rows(padded, self.indices)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (batch, seq, ...), zeros at padding."""
        if self.indices is None:
            return packed.view(self.batch, self.seqlen, *packed.shape[1:])
        return pad_input(packed, self.indices, self.batch, self.seqlen)

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


# ---- the three GEMM call sites, each in one function -------------------------------------------------


def linear_for_fusion(linear: nn.Module, x: torch.Tensor, fused_op: str):
    """Run `linear` on x, leaving its bias to the following fused op when that op can take it.

    Returns (y, bias or None). The bias is split off only for a plain nn.Linear (a LoRA or quantized
    wrapper runs whole) and only when `fused_op` runs on a fused backend: PyTorch's own addmm adds
    the bias for free, so on the torch backend it stays in the GEMM. When linear runs on a GEMM library
    that applies the bias in its epilogue (oneDNN, fp32 CPU inference), the bias stays there too.
    """
    width = linear.out_features if type(linear) is nn.Linear else 0
    if not width:
        return linear(x), None
    if fuses_epilogue(x, linear.weight, linear.bias):  # a GEMM library (not the torch reference): bias in it
        return linear_op(x, linear.weight, linear.bias), None
    if linear.bias is not None and splits_bias("torch", backend.resolved_backend(fused_op, x, width=width)):
        return F.linear(x, linear.weight), linear.bias
    return linear(x), None


def clear_fused_qkv_cache(module: nn.Module) -> None:
    """Forget the fused QKV weights of every attention module inside `module`, and its inference plans
    and remembered module checks (patch and unpatch call this)."""
    fused_qkv.forget(module)
    plan.forget_plans(module)
    support.forget_checks(module)


def _plain_linear_with_bias(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is not None


def fused_qkv_output(owner: nn.Module, query: nn.Module, key: nn.Module, value: nn.Module,
                     hidden: torch.Tensor) -> torch.Tensor | None:
    """GEMM 1 as one GEMM: (tokens, 3 * heads * head_dim), when query/key/value are plain Linears; else None."""
    if _plain_linear_with_bias(query) and _plain_linear_with_bias(key) and _plain_linear_with_bias(value):
        weight, bias = fused_qkv.fused_parameters(owner, query, key, value)
        return linear_op(hidden, weight, bias)
    return None


def _attends_on_fused_output(qkv: torch.Tensor | None, dropout_p: float, layout: "TokenLayout") -> bool:
    """Inference reads q, k, v straight from the fused GEMM's output through the same bound qkv_attention as the
    inference plan (so both run one kernel at every length); training, dropout, relative terms and tracing
    by torch.compile (the binding is Python state) take the attention ops."""
    return (qkv is not None and dropout_p == 0.0 and layout.relative is None and not layout.training
            and not backend.records_autograd(qkv) and not torch.compiler.is_compiling())


def ffn_in_activation(dense: nn.Module, activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GEMM 2: activation(dense(x)), bias+GELU fused when the activation is a GELU fastbert knows."""
    approximate = gelu_approximation(activation)
    if approximate is None:
        return activation(dense(x))
    if type(dense) is nn.Linear and fuses_gelu(x, dense.weight, dense.bias):  # GELU as the GEMM's epilogue
        return linear_op(x, dense.weight, dense.bias, activation=GELU_ACTIVATION[approximate])
    if hasattr(dense, "forward_with_activation") and not _called_with_hooks(dense):  # fastbert.Int8Linear
        return dense.forward_with_activation(x, GELU_ACTIVATION[approximate])
    y, y_bias = linear_for_fusion(dense, x, "bias_gelu")
    return bias_gelu(y, y_bias, approximate)


def _called_with_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run forward hooks (its own or global): then it is called as a module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or plan.global_hooks())


def dense_add_layer_norm(dense: nn.Module, dropout, norm: nn.LayerNorm, x, residual) -> torch.Tensor:
    """GEMM 3: LayerNorm(dropout(dense(x)) + residual), bias, dropout, residual and norm in one op."""
    y, y_bias = linear_for_fusion(dense, x, "add_layer_norm")
    p = _dropout_p(dropout)
    return add_layer_norm(y, residual, norm.weight, norm.bias, norm.eps, x_bias=y_bias, dropout_p=p)


def _dropout_p(module: nn.Module | None) -> float:
    return module.p if module is not None and module.training else 0.0


# ---- one layer ---------------------------------------------------------------------------------------


def self_attention_forward(modules: dict, heads_attribute: str, hidden: torch.Tensor, layout: TokenLayout):
    """Self-attention on packed tokens: (tokens, hidden) -> context (tokens, heads * head_dim).
    modules: a layer's pieces by name (LayerPieces.view)."""
    owner = modules["attention"]
    heads, head_dim = getattr(owner, heads_attribute), owner.attention_head_size
    scale = getattr(owner, "scaling", head_dim**-0.5)
    dropout_p = _dropout_p(modules["attention_dropout"])
    qkv = fused_qkv_output(owner, modules["query"], modules["key"], modules["value"], hidden)
    if _attends_on_fused_output(qkv, dropout_p, layout):
        bound = qkv_attention.bound_for(qkv, head_dim)
        if layout.dense:
            return bound.dense(qkv, heads, head_dim, scale, layout.batch, layout.seqlen)
        return bound.packed(qkv, heads, head_dim, scale, layout.cu_seqlens, layout.max_seqlen)
    projections = modules["query"], modules["key"], modules["value"]
    q, k, v = qkv.chunk(3, dim=-1) if qkv is not None else (module(hidden) for module in projections)
    tokens = hidden.shape[0]
    if layout.relative is not None:
        return _relative_attention(modules, (q, k, v), heads, head_dim, scale, dropout_p, layout)
    if layout.dense:
        shape = (layout.batch, layout.seqlen, heads, head_dim)  # then (batch, heads, seq, head_dim) views
        q, k, v = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
        context = attention(q, k, v, softmax_scale=scale, dropout_p=dropout_p)
        return context.transpose(1, 2).reshape(tokens, heads * head_dim)
    shape = (tokens, heads, head_dim)
    q, k, v = q.view(shape), k.view(shape), v.view(shape)
    context = varlen_attention(
        q, k, v, layout.cu_seqlens, layout.max_seqlen, softmax_scale=scale, dropout_p=dropout_p
    )
    return context.reshape(tokens, heads * head_dim)


def _relative_attention(modules: dict, qkv: tuple, heads: int, head_dim: int, scale: float, dropout_p: float,
                        layout: TokenLayout) -> torch.Tensor:
    """Self-attention with the family's relative-position terms (fastbert.models.relative), dense or packed."""
    tokens = qkv[0].shape[0]
    q, k, v = (t.view(tokens, heads, head_dim) for t in qkv)
    hook, shared = layout.relative
    own_scale = getattr(hook, "softmax_scale", None)  # DeBERTa: 1 / sqrt(3 * head_dim), on all three terms
    if own_scale is not None:
        scale = own_scale(modules, head_dim, q.dtype)
    index, q_rel, k_rel = hook.terms(modules, shared, q, k, scale)
    context = relative_attention(q, k, v, layout.offsets(q.device), layout.max_seqlen, index, q_rel=q_rel,
                                 k_rel=k_rel, softmax_scale=scale, dropout_p=dropout_p)
    return context.reshape(tokens, heads * head_dim)


def layer_forward(layer: nn.Module, hidden: torch.Tensor, layout: TokenLayout, family: Family) -> torch.Tensor:
    """One encoder layer on packed tokens (tokens, hidden), any family: its layer program on live steps.

    A training forward runs inside backend.training_forward (this thread only), here rather than around
    the layer loop, so that the recomputation of gradient checkpointing, which calls the layer again
    from backward with the same layout, takes the same implementations as the first pass."""
    if layout.training:
        with backend.training_forward():
            return _layer_forward(layer, hidden, layout, family)
    return _layer_forward(layer, hidden, layout, family)


class LiveLayer:
    """The live executor of program.post_norm: each step resolved per call from one layer's modules (training,
    dropout, hooks, PEFT and quantized wrappers, torch.compile). `call` is the forward's TokenLayout."""

    __slots__ = ("modules", "heads_attribute")

    def __init__(self, modules: dict, heads_attribute: str):
        self.modules, self.heads_attribute = modules, heads_attribute

    def attention(self, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self_attention_forward(self.modules, self.heads_attribute, hidden, layout)

    def attention_out(self, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        m = self.modules
        return dense_add_layer_norm(m["attention_dense"], m["attention_dense_dropout"], m["attention_norm"], context,
                                    hidden)

    def ffn_in(self, hidden: torch.Tensor) -> torch.Tensor:
        return ffn_in_activation(self.modules["ffn_in"], self.modules["activation"], hidden)

    def ffn_out(self, inner: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        m = self.modules
        return dense_add_layer_norm(m["ffn_out"], m["ffn_out_dropout"], m["ffn_norm"], inner, hidden)


def _layer_forward(layer: nn.Module, hidden: torch.Tensor, layout: TokenLayout, family: Family) -> torch.Tensor:
    pieces = family.pieces
    view = layout.views.get(layer)
    return family.program(LiveLayer((view or pieces.view(layer)).pieces, pieces.heads_attribute), hidden, layout)


class FastLayer:
    """Mixed into a transformers layer class: runs layer_forward when called with a TokenLayout.

    The encoder calls each layer as a module, `layer(hidden, layout)`, so that module hooks run
    (FSDP's per-layer unsharding, Accelerate's offloading, user hooks) and transformers' gradient
    checkpointing wraps the layer as it wraps its own. Called with a mask, it is transformers' layer.
    """

    _fastbert_family: Family

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if isinstance(attention_mask, TokenLayout):
            return layer_forward(self, hidden_states, attention_mask, self._fastbert_family)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


_FAST_LAYER_CLASSES: dict[type, type] = {}


def fast_layer_class(family: Family) -> type:
    """Fast<Layer>: the family's layer class with FastLayer's forward (no new state: a class swap)."""
    if family.layer not in _FAST_LAYER_CLASSES:
        name = f"Fast{family.layer.__name__}"
        cls = type(name, (FastLayer, family.layer), {"_fastbert_family": family, "__module__": __name__})
        globals()[name] = cls  # importable by name, so pickle and torch.save find it
        _FAST_LAYER_CLASSES[family.layer] = cls
    return _FAST_LAYER_CLASSES[family.layer]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, layout: TokenLayout, family: Family) -> torch.Tensor:
    if isinstance(layer, FastLayer):
        return layer(hidden, layout)
    # A layer whose class fastbert did not set (e.g. wrapped by FSDP before patching): no hooks.
    return layer_forward(layer, hidden, layout, family)


# ---- embeddings and the whole encoder ----------------------------------------------------------------


def _own_embeddings(family: Family, embeddings: nn.Module, inputs: dict, layout: TokenLayout) -> torch.Tensor:
    """An embeddings module fastbert does not know runs its own forward on the padded inputs."""
    arguments = {k: v for k, v in inputs.items() if v is not None}
    if not family.token_types:
        arguments.pop("token_type_ids", None)
    return layout.pack(embeddings(**arguments))


def embeddings_forward(family: Family, embeddings: nn.Module, inputs: dict, layout: TokenLayout) -> torch.Tensor:
    """The family's embeddings on the real tokens only: (tokens, embedding width), transformers' own modules
    called as modules (embed.embed)."""
    if family.embed is not None:
        return family.embed(embeddings, inputs, layout)
    if not embeddings_known(family, embeddings):
        return _own_embeddings(family, embeddings, inputs, layout)
    norm, dropout = embeddings.LayerNorm, embeddings.dropout
    steps = EmbeddingSteps(
        embeddings.word_embeddings, embeddings.position_embeddings,
        embeddings.token_type_embeddings if family.token_types else None,
        lambda words, positions: add_layer_norm(words, positions, norm.weight, norm.bias, norm.eps),
        dropout=lambda hidden: F.dropout(hidden, p=dropout.p, training=embeddings.training),
    )
    return embed(steps, family, embeddings, inputs, layout)


def _general_forward(model: nn.Module, family: Family, inputs: dict, layout: TokenLayout,
                     all_hidden: list | None) -> torch.Tensor:
    """Embeddings, projection and every layer call, each op resolved per call: (tokens, hidden)."""
    hidden = embeddings_forward(family, model.embeddings, inputs, layout)
    projection = family.projection_module(model)
    if projection is not None:
        hidden = projection(hidden)
    if all_hidden is not None:
        all_hidden.append(layout.unpack(hidden))
    if family.relative is not None:
        layout.relative = (family.relative, family.relative.prepare(model, layout))
    for layer in family.schedule(model):
        hidden = _run_layer(layer, hidden, layout, family)
        if all_hidden is not None:
            all_hidden.append(layout.unpack(hidden))
    return hidden


@dataclass
class EncoderResult:
    last_hidden_state: torch.Tensor  # (batch, seq, hidden), zeros at padding (but see encode)
    first_tokens: torch.Tensor  # (batch, hidden): each sequence's first real token, for the pooler
    hidden_states: tuple[torch.Tensor, ...] | None  # input of the first layer + each layer, padded, if asked
    pooled: torch.Tensor | None = None  # the pooler's output when the inference plan computed it


def encode(model: nn.Module, family: Family, inputs: dict, keep: torch.Tensor | None, options: dict,
           views: dict | None = None, layout: TokenLayout | None = None) -> EncoderResult:
    """Embeddings, projection and every layer call of a transformers base model on the fast path.

    keep: (batch, seq) bool key-padding mask (True = real token) or None for no padding.
    options: output_hidden_states (bool) and first_token_at_column_0 (bool): for heads that read
    [:, 0] of the padded output themselves, column 0 of a left-padded sequence holds its first real
    token instead of zeros. layout: given for packed inputs (TokenLayout.from_cu_seqlens), else read from keep.
    """
    if layout is None:
        reference = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        layout = TokenLayout.from_mask(keep, *reference.shape[:2])
    layout.views = views or {}
    # Training or inference: decided here, per forward, from this forward's module mode and grad mode.
    layout.training = model.training
    all_hidden = [] if options.get("output_hidden_states") else None
    # (torch.compile traces the general forward: a plan is Python state bound outside any graph; plans do
    # not bind relative-position terms, so those families run the general forward)
    inference = (not layout.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                 and family.relative is None)
    resolved = plan.plan_for(model, family, views, (family.layer, fast_layer_class(family))) if inference else None
    planned = resolved is not None and resolved.takes(inputs, layout)
    if planned:
        hidden = resolved.run(inputs, layout, all_hidden)
    else:
        hidden = _general_forward(model, family, inputs, layout, all_hidden)
    first_tokens = layout.first_tokens(hidden)
    pooled = resolved.pool(first_tokens) if planned else None
    fill = options.get("first_token_at_column_0") and not layout.dense and layout.seqlen > 0
    last = all_hidden[-1] if all_hidden and not fill else layout.unpack(hidden)
    if fill:
        last[:, 0] = first_tokens
    return EncoderResult(last, first_tokens, tuple(all_hidden) if all_hidden else None, pooled)
