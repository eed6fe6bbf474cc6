"""The inference thread feeds fastbert.encode_packed: no padded batch is built for an embedding model pooled
by mean/cls, nor for a sequence classifier whose head classify_packed knows, and their rows equal the padded
path's (the engine with packing off) and transformers'; heads it does not know keep the padded path."""
import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

import fastbert.serve.engine as engine_module
from fastbert.serve.engine import Engine, runs_packed
from fastbert.serve.loading import load_model
from fastbert.serve.options import ServeOptions
from tests.serve._reference import reference_embeddings, reference_logits
from tests.serve.conftest import TEXTS, save_checkpoint, serve, tiny_config


def test_embed_builds_no_padded_batch(embed_dir, monkeypatch):
    calls = []
    original = engine_module.encode_packed
    monkeypatch.setattr(engine_module, "encode_packed", lambda *a, **k: calls.append(k) or original(*a, **k))
    monkeypatch.setattr(Engine, "batch_tensors", lambda self, batch: pytest.fail("the padded batch was built"))
    with serve(embed_dir) as client:
        values = torch.tensor(client.post("/embed", json={"inputs": TEXTS}).json())
    assert calls and all(call["pooling"] == "mean" for call in calls)
    assert (values - reference_embeddings(embed_dir, TEXTS)).abs().max() <= 1e-5


@pytest.mark.parametrize("pooling", [("mean",), ("cls",), ("cls", "mean")])
def test_packed_rows_equal_the_padded_paths(embed_dir, pooling):
    loaded = dataclasses.replace(load_model(ServeOptions(embed_dir)), pooling=pooling)
    engine = Engine(loaded)
    batch = engine.tokenize(TEXTS + [("a pair", "of texts")], truncate=False)
    assert engine.packed
    packed = engine.forward(batch)
    engine.packed = False  # today's path: a right-padded batch, pooled over the mask
    padded = engine.forward(batch)
    assert packed.shape == padded.shape == (len(batch), 32 * len(pooling)) and packed.dtype == torch.float32
    assert (packed - padded).abs().max() <= 1e-6


def test_other_pooling_modes_keep_the_padded_path(embed_dir):
    assert not runs_packed(dataclasses.replace(load_model(ServeOptions(embed_dir)), pooling=("max",)))


def test_predict_builds_no_padded_batch(classifier_dir, monkeypatch):
    calls = []
    original = engine_module.classify_packed
    monkeypatch.setattr(engine_module, "classify_packed", lambda *a, **k: calls.append(k) or original(*a, **k))
    monkeypatch.setattr(Engine, "batch_tensors", lambda self, batch: pytest.fail("the padded batch was built"))
    with serve(classifier_dir) as client:
        answers = client.post("/predict", json={"inputs": [TEXTS[1], [TEXTS[0], TEXTS[2]]], "raw_scores": True}).json()
    assert calls and all("token_type_ids" in call for call in calls)  # the pair's token types are read
    pair = reference_logits(classifier_dir, TEXTS[:1], TEXTS[2:3])[0]
    scores = {entry["label"]: entry["score"] for entry in answers[1]}
    assert max(abs(scores[label] - pair[i].item()) for i, label in enumerate(["negative", "neutral", "positive"])
               ) <= 1e-5


@pytest.mark.parametrize("fixture", ["classifier_dir", "reranker_dir"])
def test_packed_logits_equal_the_padded_paths(fixture, request):
    engine = Engine(load_model(ServeOptions(request.getfixturevalue(fixture))))
    batch = engine.tokenize(TEXTS + [("a pair", "of texts"), (TEXTS[3], TEXTS[4])], truncate=False)
    assert engine.packed
    packed = engine.forward(batch)
    engine.packed = False
    padded = engine.forward(batch)
    assert packed.dtype == torch.float32
    assert packed.shape == padded.shape == (len(batch), engine.loaded.model.num_labels)
    assert (packed - padded).abs().max() <= 1e-5


class MeanPooledBertForSequenceClassification(transformers.BertForSequenceClassification):
    """A head classify_packed does not know: its logits read every token (the mask-weighted mean), not [CLS]."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return transformers.modeling_outputs.SequenceClassifierOutput(
            logits=self.classifier((hidden * mask).sum(1) / mask.sum(1)))


def test_an_unknown_head_takes_the_padded_path(classifier_dir, tmp_path, monkeypatch):
    head = MeanPooledBertForSequenceClassification
    folder = Path(save_checkpoint(head(tiny_config(num_labels=3)), tmp_path / "mean-head"))
    loaded = load_model(ServeOptions(str(folder)))
    loaded.model = head.from_pretrained(folder).eval()  # what a custom loader would give
    assert not runs_packed(loaded)
    engine = Engine(loaded)
    monkeypatch.setattr(engine_module, "classify_packed", lambda *a, **k: pytest.fail("ran packed"))
    batch = engine.tokenize(TEXTS, truncate=False)
    tensors = engine.batch_tensors(batch)
    with torch.inference_mode():
        expected = loaded.model(**tensors).logits
    assert (engine.forward(batch) - expected).abs().max() <= 1e-6
