"""fastbert.AutoModel and AutoModelFor*: pick fastbert's class from config.model_type."""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from fastbert.models.catalog import native_class

# What AutoConfig needs to find the config (the model class gets them too).
_HUB_ARGUMENTS = ("revision", "cache_dir", "local_files_only", "token", "proxies", "subfolder")


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
        """The class is picked from the config's model_type; the kwargs go to its from_pretrained
        untouched, so config attributes (num_labels, output_hidden_states, ...) reach the config as
        with transformers' classes (a config object passed as config= takes none, as there)."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            hub = {k: kwargs[k] for k in _HUB_ARGUMENTS if k in kwargs}
            config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path, **hub)
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
AutoModelForMultipleChoice = _auto("ForMultipleChoice")
