"""Checkpoints: safetensors or torch.load(weights_only=True) only; never a silent random init."""
from __future__ import annotations

import os
import pickle
import warnings

import pytest
import safetensors
import safetensors.torch
import torch

import fastbert
from tests.helpers import random_batch, small_config

MARKER = "UNPICKLED_CODE_RAN"


class _WritesMarker:
    """Unpickling this object calls open(path, "w"): code execution made visible as a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_checkpoint(folder, zipped: bool):
    """A model folder whose pytorch_model.bin runs code when unpickled without weights_only."""
    small_config().save_pretrained(folder)  # no dtype in the config: transformers reads the weights
    marker = os.path.join(folder, MARKER)
    payload = {"embeddings.word_embeddings.weight": _WritesMarker(marker)}
    path = os.path.join(folder, "pytorch_model.bin")
    if zipped:
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    return marker


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("zipped", [True, False], ids=["torch.save", "plain-pickle"])
@pytest.mark.parametrize("cls", [fastbert.BertModel, fastbert.BertForMaskedLM])
def test_code_in_a_pickled_checkpoint_never_runs(tmp_path, zipped, cls):
    marker = _pickle_checkpoint(tmp_path, zipped)
    with pytest.raises(Exception) as info:
        cls.from_pretrained(tmp_path)
    assert "Weights only load failed" in str(info.value) or "weights_only" in str(info.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("option", [{"weights_only": False}, {"weights_only": False, "use_safetensors": False}])
def test_weights_only_false_is_refused(tmp_path, option):
    # transformers honours weights_only=False and would unpickle (and run) the payload: fastbert refuses.
    marker = _pickle_checkpoint(tmp_path, zipped=True)
    with pytest.raises(ValueError, match="weights_only=True"):
        fastbert.BertModel.from_pretrained(tmp_path, **option)
    assert not os.path.exists(marker)


def test_trust_remote_code_is_refused(tmp_path):
    fastbert.BertModel(small_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        fastbert.BertModel.from_pretrained(tmp_path, trust_remote_code=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        fastbert.BertForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True, init_new_head=True)


# ---- weights that do not fit -------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A saved BertForMaskedLM folder and its safetensors state dict."""
    torch.manual_seed(0)
    fastbert.BertForMaskedLM(small_config()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    return tmp_path, path, safetensors.torch.load_file(path)


def _rewrite(path, tensors):
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def test_saved_checkpoint_loads_back(tmp_path):
    config = small_config()
    model = fastbert.BertForMaskedLM(config).eval()
    with torch.no_grad():  # weights that no initialization draws: a random init cannot match them
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    loaded = fastbert.BertForMaskedLM.from_pretrained(tmp_path).eval()
    state = loaded.state_dict()
    for name, tensor in safetensors.torch.load_file(tmp_path / "model.safetensors").items():
        assert torch.equal(state[name], tensor), f"{name} differs from the file"
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), f"{name} differs from the saved model"
    batch = random_batch(config, 3, 12)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_missing_weight_is_listed(saved):
    folder, path, tensors = saved
    name = "bert.encoder.layer.1.attention.self.key.weight"
    del tensors[name]
    _rewrite(path, tensors)
    with pytest.raises(fastbert.MissingWeightsError, match=r"missing \(1\): " + name.replace(".", r"\.")):
        fastbert.BertForMaskedLM.from_pretrained(folder)


def test_unexpected_weight_is_listed(saved):
    folder, path, tensors = saved
    tensors["bert.encoder.layer.0.attention.self.extra.weight"] = torch.zeros(3)
    _rewrite(path, tensors)
    expected = r"unexpected \(1\): bert\.encoder\.layer\.0\.attention\.self\.extra\.weight"
    with pytest.raises(fastbert.MissingWeightsError, match=expected):
        fastbert.BertForMaskedLM.from_pretrained(folder)


def test_wrongly_shaped_weight_is_listed(saved):
    folder, path, tensors = saved
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    _rewrite(path, tensors)
    pattern = r"wrong shape \(1\): .*" + name.replace(".", r"\.") + r".*129, 64"
    with pytest.raises(fastbert.MissingWeightsError, match=pattern):
        fastbert.BertForMaskedLM.from_pretrained(folder)
    # Asking transformers to re-initialize mismatched weights does not turn the error off.
    with pytest.raises(fastbert.MissingWeightsError, match=pattern):
        fastbert.BertForMaskedLM.from_pretrained(folder, ignore_mismatched_sizes=True)


def test_several_problems_are_listed_together(saved):
    folder, path, tensors = saved
    del tensors["cls.predictions.transform.dense.bias"]
    del tensors["bert.embeddings.LayerNorm.weight"]
    tensors["bert.surplus"] = torch.zeros(1)
    _rewrite(path, tensors)
    with pytest.raises(fastbert.MissingWeightsError) as info:
        fastbert.BertForMaskedLM.from_pretrained(folder)
    message = str(info.value)
    for name in ("cls.predictions.transform.dense.bias", "bert.embeddings.LayerNorm.weight", "bert.surplus"):
        assert name in message


# ---- damaged files ------------------------------------------------------------------------------


def _damaged(data: bytes, kind: str) -> bytes:
    header_length = int.from_bytes(data[:8], "little")
    if kind == "truncated-data":
        return data[: 8 + header_length + 100]
    if kind == "truncated-header":
        return data[: 8 + header_length // 2]
    if kind == "tiny":
        return data[:5]
    if kind == "empty":
        return b""
    if kind == "bad-header-json":
        return data[:8] + b"{" * header_length + data[8 + header_length :]
    if kind == "huge-header-length":
        return (2**40).to_bytes(8, "little") + data[8:]
    if kind == "garbage":
        return bytes(range(256)) * 8
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated-data", "truncated-header", "tiny", "empty", "bad-header-json", "huge-header-length", "garbage"]
)
def test_damaged_safetensors_raises_instead_of_random_init(saved, kind):
    folder, path, _ = saved
    path.write_bytes(_damaged(path.read_bytes(), kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            fastbert.BertForMaskedLM.from_pretrained(folder)
    assert isinstance(info.value, (safetensors.SafetensorError, OSError, ValueError)), repr(info.value)


def test_missing_weights_file_raises(saved):
    folder, path, _ = saved
    path.unlink()
    with pytest.raises(OSError):
        fastbert.BertForMaskedLM.from_pretrained(folder)
