"""The model `fastbert pretrain` trains: from a named preset, a config.json directory, or a checkpoint."""
from __future__ import annotations

from pathlib import Path

import transformers

from fastbert.presets import PRESETS, preset_config

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def model_class(nsp: bool):
    import fastbert

    return fastbert.BertForPreTraining if nsp else fastbert.BertForMaskedLM


def has_weights(directory: str | Path) -> bool:
    return any((Path(directory) / name).exists() for name in WEIGHT_FILES)


def resolve_config(spec: str, tokenizer) -> transformers.BertConfig:
    """--config: a directory holding config.json, or a preset name (its vocabulary sized to the tokenizer)."""
    if Path(spec).is_dir():
        config = transformers.AutoConfig.from_pretrained(spec)
    elif spec in PRESETS:
        config = preset_config(spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(f"--config {spec!r} is neither a directory nor a preset ({', '.join(PRESETS)})")
    if not isinstance(config, transformers.BertConfig):
        raise ValueError(f"fastbert pretrain trains BERT; --config {spec!r} is a {type(config).__name__}")
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"the config's vocab_size {config.vocab_size} is below the tokenizer's {len(tokenizer)}")
    return config


def check_sequence_length(config, max_seq_length: int) -> None:
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(
            f"--max-seq-length {max_seq_length} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )


def build_model(spec: str, tokenizer, nsp: bool):
    """A fresh model for a preset or config directory; the checkpoint's weights for a checkpoint directory.

    A checkpoint without the pretraining heads (a plain BertModel, or an MLM-only run continued with
    NSP) gets fresh heads; the ones initialized are printed, never silently.
    """
    config = resolve_config(spec, tokenizer)
    cls = model_class(nsp)
    if not has_weights(spec):
        model = cls(config)
    else:
        model, info = cls.from_pretrained(spec, init_new_head=True, output_loading_info=True)
        fresh = sorted(info.get("missing_keys", ())) + [key for key, *_ in info.get("mismatched_keys", ())]
        if fresh:
            print(f"fastbert pretrain: {spec} lacks {len(fresh)} head weights, initialized fresh: {', '.join(fresh)}")
    model.sparse_mlm_head = True
    return model
