"""The table of model families the fast encoder runs: one declaration per family, no code per family.

A family says which transformers classes it matches exactly, where the encoder's layers and the pieces
of a layer live (attribute paths), how its embeddings number positions, which projection (if any) runs
between the embeddings and the layers, in which order the layers are called (ALBERT calls shared
layers several times) and how the pooler reads the first token. fastbert.models.encoder runs every
family from these declarations; fastbert.models.native builds the classes; fastbert.patch finds models.

Adding a family: a row in FAMILIES, plus a positions/schedule/pooler function where none fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import nn
from transformers import modeling_outputs as outputs
from transformers.models.albert import modeling_albert
from transformers.models.bert import modeling_bert
from transformers.models.camembert import modeling_camembert
from transformers.models.deberta_v2 import modeling_deberta_v2
from transformers.models.distilbert import modeling_distilbert
from transformers.models.electra import modeling_electra
from transformers.models.mpnet import modeling_mpnet
from transformers.models.roberta import modeling_roberta
from transformers.models.xlm_roberta import modeling_xlm_roberta

from fastbert.models import deberta
from fastbert.models.pieces import PIECE_NAMES, LayerPieces, LayerView  # noqa: F401 (re-exported)
from fastbert.models.program import post_norm
from fastbert.models.relative import MPNET_RELATIVE, RelativePositions


def _bert_like_pieces(module: ModuleType, prefix: str, classes: dict | None = None, **paths) -> LayerPieces:
    """BERT's layer layout (attention.self and attention.output, intermediate, output) with transformers' class
    names prefix + "Attention", ...; `paths` replace piece paths, `classes` container classes by path (None: the
    family has no such container)."""
    classes = classes or {}
    names = {"attention": "Attention", "attention.self": "SelfAttention", "attention.output": "SelfOutput",
             "intermediate": "Intermediate", "output": "Output"}
    containers = {path: classes[path] if path in classes else getattr(module, prefix + name)
                  for path, name in names.items()} | classes
    return LayerPieces(**{
        "attention": "attention.self",
        "heads_attribute": "num_attention_heads",
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_dropout": "attention.self.dropout",
        "attention_dense": "attention.output.dense",
        "attention_dense_dropout": "attention.output.dropout",
        "attention_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "activation": "intermediate.intermediate_act_fn",
        "ffn_out": "output.dense",
        "ffn_out_dropout": "output.dropout",
        "ffn_norm": "output.LayerNorm",
        **paths,
        "containers": tuple((path, cls) for path, cls in containers.items() if cls is not None),
    })


DISTILBERT_PIECES = LayerPieces(
    attention="attention",
    heads_attribute="n_heads",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attention_dropout="attention.dropout",
    attention_dense="attention.out_lin",
    attention_dense_dropout=None,  # DistilBERT applies no dropout to the attention output
    attention_norm="sa_layer_norm",
    ffn_in="ffn.lin1",
    activation="ffn.activation",
    ffn_out="ffn.lin2",
    ffn_out_dropout="ffn.dropout",
    ffn_norm="output_layer_norm",
    containers=(("attention", modeling_distilbert.DistilBertSelfAttention), ("ffn", modeling_distilbert.FFN)),
)

ALBERT_PIECES = LayerPieces(
    attention="attention",
    heads_attribute="num_attention_heads",
    query="attention.query",
    key="attention.key",
    value="attention.value",
    attention_dropout="attention.attention_dropout",
    attention_dense="attention.dense",
    attention_dense_dropout="attention.output_dropout",
    attention_norm="attention.LayerNorm",
    ffn_in="ffn",
    activation="activation",
    ffn_out="ffn_output",
    ffn_out_dropout=None,  # AlbertLayer has a dropout module but never applies it after ffn_output
    ffn_norm="full_layer_layer_norm",
    containers=(("attention", modeling_albert.AlbertAttention),),
)


MPNET_PIECES = _bert_like_pieces(
    modeling_mpnet, "MPNet", classes={"attention.self": None, "attention.output": None,
                                      "attention.attn": modeling_mpnet.MPNetSelfAttention},
    attention="attention.attn", query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
    attention_dropout="attention.attn.dropout",
    attention_dense="attention.attn.o",  # MPNet's output projection sits in its self-attention module
    attention_dense_dropout="attention.dropout", attention_norm="attention.LayerNorm",
)

DEBERTA_PIECES = _bert_like_pieces(
    modeling_deberta_v2, "DebertaV2", classes={"attention.self": modeling_deberta_v2.DisentangledSelfAttention},
    query="attention.self.query_proj", key="attention.self.key_proj", value="attention.self.value_proj",
)

# ---- positions: (embeddings, input_ids or None, batch, seqlen) -> (1 or batch, seqlen) position ids ----


def column_positions(embeddings: nn.Module, input_ids, batch: int, seqlen: int) -> torch.Tensor:
    """BERT, ELECTRA, ALBERT, DistilBERT: the column index, whatever the padding."""
    return embeddings.position_ids[:, :seqlen]


def padding_offset_positions(embeddings: nn.Module, input_ids, batch: int, seqlen: int) -> torch.Tensor:
    """RoBERTa, XLM-R, CamemBERT (fairseq), MPNet: positions count the tokens whose id is not the pad id,
    starting at padding_idx + 1; a pad id keeps position padding_idx and does not advance the count.
    Computed from input_ids, not the attention mask, so left and right padding agree. Without ids
    (inputs_embeds) they run by column from padding_idx + 1."""
    pad = embeddings.padding_idx
    if input_ids is None:
        return torch.arange(pad + 1, seqlen + pad + 1, device=embeddings.position_ids.device)[None]
    real = input_ids.ne(pad).int()
    return (torch.cumsum(real, dim=1).type_as(real) * real).long() + pad


# ---- layer schedules: base model -> the layer modules in call order ----


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.encoder.layer)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.transformer.layer)


def albert_layers(model: nn.Module) -> list[nn.Module]:
    """ALBERT shares layers: group g = i // (layers / groups) runs for layer i, each of its inner layers once."""
    config, groups = model.config, model.encoder.albert_layer_groups
    schedule = []
    for i in range(config.num_hidden_layers):
        group = groups[int(i / (config.num_hidden_layers / config.num_hidden_groups))]
        schedule.extend(group.albert_layers)
    return schedule


def albert_containers(model: nn.Module) -> list[nn.Module]:
    return list(model.encoder.albert_layer_groups)


def no_containers(model: nn.Module) -> list[nn.Module]:
    return []


# ---- poolers: (base model, first real token of each sequence (batch, hidden)) -> pooled or None ----


def module_pooler(model: nn.Module, first_tokens: torch.Tensor):
    """BertPooler-style: a module that reads [:, 0]; handed each sequence's first real token."""
    return None if model.pooler is None else model.pooler(first_tokens[:, None])


def albert_pooler(model: nn.Module, first_tokens: torch.Tensor):
    return None if model.pooler is None else model.pooler_activation(model.pooler(first_tokens))


def no_pooler(model: nn.Module, first_tokens: torch.Tensor):
    return None


@dataclass(frozen=True)
class Family:
    name: str  # as users write it: "RoBERTa"
    model_type: str  # config.model_type
    class_prefix: str  # transformers' class names are class_prefix + "Model", + "ForMaskedLM", ...
    base: type  # the transformers base model class, matched exactly
    embeddings: type  # exact embeddings class
    layer: type  # exact layer class
    pieces: LayerPieces
    encoder: tuple[str, type]  # (attribute, exact class) of the module holding the layers
    groups: type | None  # exact class of ALBERT's layer groups; None elsewhere
    positions: Callable
    token_types: bool
    projection: str | None  # attribute path of a Linear between embeddings and layers, if the model has it
    schedule: Callable
    pooler: type | None  # exact class of a module pooler (module_pooler); None when pool needs none
    pool: Callable
    output_class: type
    heads: tuple[str, ...]  # suffixes of transformers' head classes
    first_token_heads: tuple[str, ...] = ()  # heads that read [:, 0] of the padded output themselves
    relative: RelativePositions | None = None  # relative-position terms in the scores (fastbert.models.relative)
    # The family's own embeddings forward, (embeddings, inputs, layout) -> (tokens, hidden), where the
    # generic one (tables by family.positions/token_types) does not fit (DeBERTa: optional tables, embed_proj)
    embed: Callable | None = None
    # (base model) -> names of inputs its embeddings ignore (DeBERTa-v3: token_type_ids, position_ids):
    # neither validated nor read, as in transformers
    unread: Callable | None = None
    # the layer program (fastbert.models.program): the order of a layer's steps, run by the live forward
    # (encoder.LiveLayer) and, for post_norm, by the inference plan's bound steps
    program: Callable = post_norm

    def hf_class(self, suffix: str) -> type:
        return getattr(_MODULES[self.model_type], self.class_prefix + suffix)

    def first_position(self, config) -> int:
        """The position id of the first token: padding_idx + 1 for fairseq positions, else 0."""
        return config.pad_token_id + 1 if self.positions is padding_offset_positions else 0

    def projection_module(self, model: nn.Module, attribute: Callable = None) -> nn.Module | None:
        """The Linear at `projection` (both forwards look it up here), or None: ELECTRA has embeddings_project
        only when embedding_size != hidden_size. attribute(parent, name) -> child or None (the plan records
        its lookups); getattr by default."""
        node = None if self.projection is None else model
        for name in self.projection.split(".") if node is not None else ():
            node = attribute(node, name) if attribute is not None else getattr(node, name, None)
            if node is None:
                return None
        return node

    def container_modules(self, model: nn.Module) -> list[nn.Module]:
        return albert_containers(model) if self.groups is not None else no_containers(model)


_MODULES = {
    "bert": modeling_bert,
    "roberta": modeling_roberta,
    "xlm-roberta": modeling_xlm_roberta,
    "camembert": modeling_camembert,
    "electra": modeling_electra,
    "distilbert": modeling_distilbert,
    "albert": modeling_albert,
    "mpnet": modeling_mpnet,
    "deberta-v2": modeling_deberta_v2,
}

_ENCODER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


def _bert_like(name: str, model_type: str, prefix: str, positions: Callable, heads: tuple, **extra) -> Family:
    """A family laid out as BERT's, with transformers' class names prefix + "Model", ...; `extra` sets the rest and
    replaces any default."""
    module = _MODULES[model_type]
    pooler = getattr(module, f"{prefix}Pooler", None)
    row = dict(
        base=getattr(module, f"{prefix}Model"),
        embeddings=getattr(module, f"{prefix}Embeddings"),
        layer=getattr(module, f"{prefix}Layer"),
        encoder=("encoder", getattr(module, f"{prefix}Encoder")),
        groups=None,
        token_types=True,
        projection=None,
        schedule=encoder_layers,
        pooler=pooler,
        pool=module_pooler if pooler is not None else no_pooler,
        output_class=outputs.BaseModelOutputWithPoolingAndCrossAttentions,
    )
    if "pieces" not in extra:
        row["pieces"] = _bert_like_pieces(module, prefix)
    return Family(name=name, model_type=model_type, class_prefix=prefix, positions=positions, heads=heads,
                  **(row | extra))


_ROBERTA_HEADS = ("ForMaskedLM", "ForCausalLM", *_ENCODER_HEADS)

FAMILIES: tuple[Family, ...] = (
    _bert_like(
        "BERT", "bert", "Bert", column_positions,
        ("ForPreTraining", "ForMaskedLM", "ForNextSentencePrediction", *_ENCODER_HEADS),
    ),
    _bert_like("RoBERTa", "roberta", "Roberta", padding_offset_positions, _ROBERTA_HEADS,
               first_token_heads=("ForSequenceClassification",)),
    _bert_like("XLM-RoBERTa", "xlm-roberta", "XLMRoberta", padding_offset_positions, _ROBERTA_HEADS,
               first_token_heads=("ForSequenceClassification",)),
    _bert_like("CamemBERT", "camembert", "Camembert", padding_offset_positions, _ROBERTA_HEADS,
               first_token_heads=("ForSequenceClassification",)),
    _bert_like(
        "ELECTRA", "electra", "Electra", column_positions,
        ("ForPreTraining", "ForMaskedLM", "ForCausalLM", *_ENCODER_HEADS),
        projection="embeddings_project",
        output_class=outputs.BaseModelOutputWithPastAndCrossAttentions,
        first_token_heads=("ForSequenceClassification", "ForMultipleChoice"),
    ),
    # DistilBERT and ALBERT: their own module trees, one line per aspect (names; modules; positions and
    # layers; pooling and outputs)
    Family(
        name="DistilBERT", model_type="distilbert", class_prefix="DistilBert",
        base=modeling_distilbert.DistilBertModel, embeddings=modeling_distilbert.Embeddings,
        layer=modeling_distilbert.TransformerBlock, pieces=DISTILBERT_PIECES,
        encoder=("transformer", modeling_distilbert.Transformer), groups=None,
        positions=column_positions, token_types=False, projection=None, schedule=transformer_layers,
        pooler=None, pool=no_pooler, output_class=outputs.BaseModelOutput,
        heads=("ForMaskedLM", *_ENCODER_HEADS), first_token_heads=("ForSequenceClassification", "ForMultipleChoice"),
    ),
    Family(
        name="ALBERT", model_type="albert", class_prefix="Albert",
        base=modeling_albert.AlbertModel, embeddings=modeling_albert.AlbertEmbeddings,
        layer=modeling_albert.AlbertLayer, pieces=ALBERT_PIECES,
        encoder=("encoder", modeling_albert.AlbertTransformer), groups=modeling_albert.AlbertLayerGroup,
        positions=column_positions, token_types=True, projection="encoder.embedding_hidden_mapping_in",
        schedule=albert_layers,
        pooler=None, pool=albert_pooler, output_class=outputs.BaseModelOutputWithPooling,
        heads=("ForPreTraining", "ForMaskedLM", *_ENCODER_HEADS),
    ),
    _bert_like(
        "MPNet", "mpnet", "MPNet", padding_offset_positions,  # fairseq's, from padding_idx 1
        ("ForMaskedLM", *_ENCODER_HEADS),
        pieces=MPNET_PIECES, token_types=False, output_class=outputs.BaseModelOutputWithPooling,
        first_token_heads=("ForSequenceClassification",), relative=MPNET_RELATIVE,
    ),
    _bert_like(
        "DeBERTa-v2/v3", "deberta-v2", "DebertaV2",
        column_positions,  # position_biased_input only (v3 has no absolute positions)
        ("ForMaskedLM", *_ENCODER_HEADS),
        pieces=DEBERTA_PIECES,
        # no pooler: the heads' ContextPooler reads [:, 0] itself; embed_proj lives in the embeddings
        output_class=outputs.BaseModelOutput,
        first_token_heads=("ForSequenceClassification", "ForMultipleChoice"),
        relative=deberta.DEBERTA_RELATIVE, embed=deberta.embeddings_forward, unread=deberta.unread_inputs,
    ),
)

_BY_BASE = {family.base: family for family in FAMILIES}
_BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}


def family_of_base(cls: type) -> Family | None:
    """The family whose transformers base model class is exactly `cls`."""
    return _BY_BASE.get(cls)


def family_of_model_type(model_type: str) -> Family:
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"fastbert has no model family for model_type={model_type!r}; supported: {supported_names()}"
        )
    return _BY_MODEL_TYPE[model_type]


def base_classes() -> tuple[type, ...]:
    return tuple(_BY_BASE)


def supported_names() -> str:
    return ", ".join(f"{family.name} ({family.model_type})" for family in FAMILIES)
