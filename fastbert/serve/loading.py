"""The served model: fastbert's native class from a local directory (or a Hub snapshot), its fast tokenizer,
and the sentence-transformers pipeline (modules.json, 1_Pooling/config.json, sentence_bert_config.json,
config_sentence_transformers.json's prompts) when present."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from fastbert.serve.options import ServeConfigError, ServeOptions
from fastbert.serve.pooling import POOLING_MODES, pooling_modes_from_config
from fastbert.serve.precision import DtypeChoice

logger = logging.getLogger("fastbert.serve")
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
# What a Hub snapshot needs: configs, tokenizer files, safetensors weights (not the ONNX/OpenVINO exports)
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


@dataclass
class SentenceTransformersConfig:
    """What a sentence-transformers directory says about pooling, normalization and length."""

    pooling: tuple[str, ...] | None = None
    normalize: bool = False
    max_seq_length: int | None = None
    present: bool = False
    prompts: dict[str, str] = field(default_factory=dict)  # config_sentence_transformers.json's "prompts"


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "embedding" or "classifier"
    tokenizer_dir: str
    max_input_length: int
    pooling: tuple[str, ...] = ()
    id2label: dict = field(default_factory=dict)
    problem_type: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None  # put before each input whose request names no prompt
    dtype_choice: DtypeChoice = DtypeChoice("fp32", "as loaded")  # set by engine.settle_dtype

    def prompt(self, name: str | None) -> str | None:
        """The text put before each input: the prompt `name`, else the server's default prompt."""
        return self.default_prompt if name is None else prompt_text(self.prompts, name)


def prompt_text(prompts: dict[str, str], name: str) -> str:
    """prompts[name], or a ValueError naming the known prompts (TEI's check)."""
    if name not in prompts:
        known = ", ".join(sorted(prompts)) or "none (config_sentence_transformers.json has no prompts)"
        raise ValueError(f"unknown prompt {name!r}; this model's prompts: {known}")
    return prompts[name]


def resolve_model_dir(model_id: str, revision: str | None = None, cache_dir: str | None = None,
                      token: str | None = None) -> str:
    """The local directory of `model_id`: the directory itself, else a Hub snapshot of that id at `revision`
    (downloaded, or from the cache when offline)."""
    if Path(model_id).expanduser().is_dir():
        if revision not in (None, "main"):
            raise ServeConfigError(f"--revision {revision}: {model_id} is a local directory, which has no "
                                   "revisions (give a Hub id to pick one)")
        return str(Path(model_id).expanduser())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                 allow_patterns=HUB_FILES)
    except Exception as exc:  # offline, unknown id, bad revision, invalid name: all one startup error
        reason = next(iter(str(exc).splitlines()), "")
        raise ServeConfigError(f"--model-id {model_id}: not a local directory, and not loadable from the Hub "
                               f"({type(exc).__name__}: {reason})") from None


def read_sentence_transformers_config(model_dir: Path) -> SentenceTransformersConfig:
    """Pooling modes, Normalize and max_seq_length from a sentence-transformers directory; a module this
    server cannot reproduce (Dense, a custom module) is an error rather than a silently different embedding."""
    modules_file = model_dir / "modules.json"
    if not modules_file.exists():
        return SentenceTransformersConfig(pooling=_pooling_config(model_dir / "1_Pooling"), prompts=_prompts(model_dir))
    config = SentenceTransformersConfig(present=True)
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type")
        if kind == ST_POOLING:
            config.pooling = _pooling_config(model_dir / module.get("path", "1_Pooling"))
        elif kind == ST_NORMALIZE:
            config.normalize = True
        elif kind != ST_TRANSFORMER:
            raise ServeConfigError(f"{modules_file}: module {kind!r} is not supported (supported: "
                                   f"{ST_TRANSFORMER}, {ST_POOLING}, {ST_NORMALIZE})")
    bert_config = model_dir / "sentence_bert_config.json"
    if bert_config.exists():
        config.max_seq_length = json.loads(bert_config.read_text()).get("max_seq_length")
    config.prompts = _prompts(model_dir)
    return config


def _prompts(model_dir: Path) -> dict[str, str]:
    path = model_dir / "config_sentence_transformers.json"
    return dict(json.loads(path.read_text()).get("prompts") or {}) if path.exists() else {}


def _pooling_config(folder: Path) -> tuple[str, ...] | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        return pooling_modes_from_config(json.loads(path.read_text()))
    except ValueError as exc:
        raise ServeConfigError(f"{path}: {exc}") from None


def _is_classifier(config) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or []))


def _model_length_limit(config, tokenizer) -> int:
    """Positions the model has (fairseq-style families, RoBERTa and MPNet, start at padding_idx + 1), capped by
    the tokenizer's."""
    from fastbert.models.families import FAMILIES

    positions = getattr(config, "max_position_embeddings", None) or 512
    family = next((f for f in FAMILIES if f.model_type == config.model_type), None)
    if family is not None:
        positions -= family.first_position(config)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        positions = min(positions, tokenizer_limit)
    return positions


def _resolve_length(options: ServeOptions, limit: int, st_config: SentenceTransformersConfig) -> int:
    if options.max_input_length is None:
        return _fit_batch(options, min(limit, st_config.max_seq_length or limit))
    if options.max_input_length > limit:
        raise ServeConfigError(f"--max-input-length {options.max_input_length}: the model takes at most {limit} "
                               "tokens")
    if options.max_input_length > options.max_batch_tokens:
        raise ServeConfigError(f"--max-batch-tokens {options.max_batch_tokens} is below --max-input-length "
                               f"{options.max_input_length}: one sequence must fit in one forward")
    return options.max_input_length


def _fit_batch(options: ServeOptions, length: int) -> int:
    """TEI's rule: a model limit over --max-batch-tokens is cut to it when truncating, else a startup error."""
    if length <= options.max_batch_tokens:
        return length
    if not options.auto_truncate:
        raise ServeConfigError(f"--max-batch-tokens {options.max_batch_tokens} is below the input length limit "
                               f"{length}: one sequence must fit in one forward (raise it, or let --auto-truncate "
                               "cut inputs to it)")
    logger.warning("fastbert serve: inputs are cut to --max-batch-tokens %d tokens (the model takes %d)",
                   options.max_batch_tokens, length)
    return options.max_batch_tokens


def _resolve_prompt(options: ServeOptions, prompts: dict[str, str]) -> str | None:
    if options.default_prompt_name is None:
        return options.default_prompt
    try:
        return prompt_text(prompts, options.default_prompt_name)
    except ValueError as exc:
        raise ServeConfigError(f"--default-prompt-name: {exc}") from None


def _resolve_pooling(options: ServeOptions, st_config: SentenceTransformersConfig) -> tuple[str, ...]:
    if options.pooling is not None:  # checked by ServeOptions
        return (options.pooling,)
    if st_config.pooling is None:
        raise ServeConfigError("--pooling is not set and the model directory has no 1_Pooling/config.json: "
                               f"pass --pooling ({', '.join(POOLING_MODES)})")
    return st_config.pooling


def load_tokenizer(model_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    if not tokenizer.is_fast:
        raise ServeConfigError(f"{model_dir}: no fast tokenizer (tokenizer.json or a convertible vocabulary) found")
    return tokenizer


def _apply_dtype(model: nn.Module, options: ServeOptions) -> nn.Module:
    """The model in the dtype asked for; auto stays fp32 here (engine.settle_dtype measures it)."""
    if options.dtype == "bf16":
        return model.to(torch.bfloat16)
    if options.dtype == "int8":
        return _quantize(model, options)
    return model


def _quantize(model: nn.Module, options: ServeOptions) -> nn.Module:
    """fastbert.quantize with the --calibration texts: int8 Linears where its accuracy gate allows."""
    from fastbert import quantize

    if options.calibration is None:
        raise ServeConfigError("--dtype int8 needs --calibration FILE: a few hundred of your own texts, one a line "
                               "(the int8 model is checked against the fp32 one on them)")
    lines = [line for line in Path(options.calibration).read_text().splitlines() if line.strip()]
    if not lines:
        raise ServeConfigError(f"--calibration {options.calibration}: the file has no non-empty line")
    report = quantize(model, calibration=lines, tokenizer=load_tokenizer(options.model_dir))
    logger.info("fastbert serve: %s", report.summary())
    return report.model if report.model is not None else model


def load_model(options: ServeOptions) -> LoadedModel:
    """The model for `options`: a sequence classifier when config.architectures says so, else the base
    model with sentence-transformers pooling."""
    import fastbert

    model_dir = Path(options.model_dir)
    if not (model_dir / "config.json").exists():
        raise ServeConfigError(f"{options.model_dir}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    st_config = read_sentence_transformers_config(model_dir)
    length = _resolve_length(options, _model_length_limit(config, tokenizer), st_config)
    prompt = _resolve_prompt(options, st_config.prompts)
    if _is_classifier(config):
        model = fastbert.AutoModelForSequenceClassification.from_pretrained(model_dir)
        loaded = LoadedModel(model, "classifier", str(model_dir), length,
                             id2label={int(k): v for k, v in config.id2label.items()},
                             problem_type=config.problem_type)
    else:
        model = fastbert.AutoModel.from_pretrained(model_dir)
        loaded = LoadedModel(model, "embedding", str(model_dir), length, pooling=_resolve_pooling(options, st_config))
    loaded.model = _apply_dtype(loaded.model.eval(), options)
    loaded.prompts, loaded.default_prompt = st_config.prompts, prompt
    return loaded
