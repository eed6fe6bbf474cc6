"""Loading errors that name what is wrong, the pooler as part of a new head, and copies without caches."""
import copy
import io
import pickle

import pytest
import torch
import transformers

import fastbert
from fastbert.models import encoder, fused_qkv, plan
from tests.helpers import max_error, random_batch, small_config


def _saved(tmp_path, hf_class):
    torch.manual_seed(0)
    model = getattr(transformers, hf_class)(small_config())
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "bad header"])
def test_corrupt_safetensors_raises_an_error_naming_the_file(tmp_path, damage):
    directory = _saved(tmp_path, "BertModel")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(fastbert.CorruptCheckpointError, match="model.safetensors") as caught:
        fastbert.BertModel.from_pretrained(directory)
    assert isinstance(caught.value, OSError)
    assert str(path) in str(caught.value) and "truncated or corrupted" in str(caught.value)


def test_masked_lm_checkpoint_to_classifier_initializes_the_pooler_with_the_new_head(tmp_path):
    directory = _saved(tmp_path, "BertForMaskedLM")  # BertForMaskedLM has no pooler
    model, info = fastbert.BertForSequenceClassification.from_pretrained(directory, output_loading_info=True)
    assert model.bert.pooler is not None
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= info["missing_keys"]


def test_base_model_from_a_checkpoint_without_pooler_creates_one_as_transformers_does(tmp_path):
    directory = _saved(tmp_path, "BertForMaskedLM")
    assert fastbert.BertModel.from_pretrained(directory).pooler is not None
    assert fastbert.BertModel.from_pretrained(directory, add_pooling_layer=False).pooler is None
    assert fastbert.BertModel.from_pretrained(directory, init_new_head=True).pooler is not None


def test_missing_encoder_weights_still_raise_with_init_new_head(tmp_path):
    directory = _saved(tmp_path, "BertForMaskedLM")
    config = small_config(num_hidden_layers=3)  # a layer the checkpoint does not have
    with pytest.raises(fastbert.MissingWeightsError, match="encoder.layer.2"):
        fastbert.BertForSequenceClassification.from_pretrained(directory, config=config, init_new_head=True)


def _model_with_warm_cache():
    config = small_config()
    model = fastbert.BertModel(config).eval()
    with torch.no_grad():
        model(**random_batch(config, 2, 6))
    # the inference plan (fastbert/models/plan.py) binds the fused weights of the one cache (fused_qkv.py)
    filled = model in plan._PLANS and fused_qkv.cached(model)
    assert filled, "the forward should have filled the cache"
    return model, config


def _saved_size(model) -> int:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.tell()


def test_deepcopy_carries_no_fused_qkv_cache():
    model, config = _model_with_warm_cache()
    clone = copy.deepcopy(model)
    assert not any(m in plan._PLANS for m in clone.modules()) and not fused_qkv.cached(clone)
    batch = random_batch(config, 2, 6)
    with torch.no_grad():
        assert max_error(clone(**batch).last_hidden_state, model(**batch).last_hidden_state) == 0


def test_torch_save_of_the_model_carries_no_fused_qkv_cache():
    model, _ = _model_with_warm_cache()
    warm = _saved_size(model)
    encoder.clear_fused_qkv_cache(model)
    assert warm == _saved_size(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is fastbert.BertModel


def test_pickle_carries_no_fused_qkv_cache():
    model, _ = _model_with_warm_cache()
    warm = len(pickle.dumps(model))
    encoder.clear_fused_qkv_cache(model)
    assert warm == len(pickle.dumps(model))
    assert not any("_fastbert_qkv_cache" in m.__dict__ for m in pickle.loads(pickle.dumps(model)).modules())
