"""The inference thread feeds fastbert.encode_packed: no padded batch is built for an embedding model pooled
by mean/cls, and its rows equal the padded path's (the engine with packing off) and transformers'."""
import dataclasses

import pytest
import torch

import fastbert.serve.engine as engine_module
from fastbert.serve.engine import Engine, runs_packed
from fastbert.serve.loading import load_model
from fastbert.serve.options import ServeOptions
from tests.serve._reference import reference_embeddings
from tests.serve.conftest import TEXTS, serve


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


def test_classifiers_and_other_pooling_modes_keep_the_padded_path(embed_dir, classifier_dir):
    assert not runs_packed(load_model(ServeOptions(classifier_dir)))
    assert not runs_packed(dataclasses.replace(load_model(ServeOptions(embed_dir)), pooling=("max",)))
