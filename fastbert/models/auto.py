"""fastbert.AutoModel and AutoModelFor*: pick fastbert's class from config.model_type."""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from fastbert.models.catalog import native_class

_CONFIG_ARGUMENTS = ("revision", "cache_dir", "local_files_only", "token")


class _AutoFastModel:
    """from_pretrained / from_config that dispatch on config.model_type to fastbert's native class."""

    _suffix = "Model"

    def __init__(self, *args, **kwargs):
        raise TypeError(f"use {type(self).__name__}.from_pretrained(...) or .from_config(config)")

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs):
        return native_class(config.model_type, cls._suffix)(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config_kwargs = {k: kwargs[k] for k in _CONFIG_ARGUMENTS if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
            kwargs["config"] = config
        model_class = native_class(config.model_type, cls._suffix)
        return model_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _auto(suffix: str) -> type:
    name = "AutoModel" + ("" if suffix == "Model" else suffix)
    doc = f"fastbert's {suffix} class for the checkpoint's model_type (BERT, RoBERTa, ..., ALBERT)."
    return type(name, (_AutoFastModel,), {"_suffix": suffix, "__doc__": doc, "__module__": __name__})


AutoModel = _auto("Model")
AutoModelForMaskedLM = _auto("ForMaskedLM")
AutoModelForSequenceClassification = _auto("ForSequenceClassification")
AutoModelForTokenClassification = _auto("ForTokenClassification")
AutoModelForQuestionAnswering = _auto("ForQuestionAnswering")
