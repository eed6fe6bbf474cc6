"""Named model configurations shaped like the public checkpoints, for random-init models.

Nothing here downloads anything: `preset_config("roberta-base")` builds a transformers config with the
shape of roberta-base (its vocabulary size, positions, eps, activation, ...). `fastbert bench --arch`
and `fastbert pretrain --config` use these names.
"""
from __future__ import annotations

import transformers

# name -> (transformers config class name, keyword arguments that differ from that class's defaults)
PRESETS: dict[str, tuple[str, dict]] = {
    "bert-base": ("BertConfig", {}),
    "bert-small": ("BertConfig", dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                      intermediate_size=2048)),
    "bert-mini": ("BertConfig", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024)),
    "bert-tiny": ("BertConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=512)),
    "roberta-base": ("RobertaConfig", dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                           layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "xlm-roberta-base": ("XLMRobertaConfig", dict(vocab_size=250002, max_position_embeddings=514,
                                                  type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                                                  bos_token_id=0, eos_token_id=2)),
    "distilbert-base": ("DistilBertConfig", {}),
    "electra-base": ("ElectraConfig", dict(embedding_size=768, hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, intermediate_size=3072)),
    "albert-base": ("AlbertConfig", dict(embedding_size=128, hidden_size=768, num_attention_heads=12,
                                         intermediate_size=3072, hidden_act="gelu_new")),
    "modernbert-base": ("ModernBertConfig", {}),  # ModernBertConfig() is answerdotai/ModernBERT-base's shape
    # sentence-transformers/all-mpnet-base-v2 (microsoft/mpnet-base): 32 relative buckets, fairseq positions
    "mpnet-base": ("MPNetConfig", dict(max_position_embeddings=514, layer_norm_eps=1e-5)),
    # microsoft/deberta-v3-base: relative positions only (log buckets), shared key/query projections
    "deberta-v3-base": ("DebertaV2Config", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                intermediate_size=3072, vocab_size=128100, max_position_embeddings=512,
                                                position_buckets=256, relative_attention=True,
                                                pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                                share_att_key=True, position_biased_input=False, type_vocab_size=0,
                                                layer_norm_eps=1e-7, max_relative_positions=-1, pooler_hidden_size=768,
                                                pooler_dropout=0, pooler_hidden_act="gelu", hidden_act="gelu")),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_config(name: str, **overrides) -> transformers.PretrainedConfig:
    """A fresh transformers config for preset `name`, with `overrides` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    class_name, kwargs = PRESETS[name]
    config_class = getattr(transformers, class_name)
    return config_class(**{**kwargs, **overrides})
