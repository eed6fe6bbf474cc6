"""The real all-MiniLM-L6-v2 served by fastbert equals sentence-transformers' encode to 1e-5 (fp32)."""
import numpy as np
import pytest

from tests.serve.conftest import minilm, serve

SENTENCES = ["fastbert removes padding once and runs every layer on packed tokens.", "Short one.",
             "A third sentence, of middling length, with punctuation: commas, colons; and more.",
             "Concurrent requests are packed into one varlen forward by the batcher."]


def test_minilm_embed_equals_sentence_transformers_encode():
    sentence_transformers = pytest.importorskip("sentence_transformers",
                                                reason="sentence-transformers is not installed")
    checkpoint = str(minilm.get_model_path())
    expected = sentence_transformers.SentenceTransformer(checkpoint, device="cpu").encode(SENTENCES)
    with serve(checkpoint) as client:
        info = client.get("/info").json()
        together = np.array(client.post("/embed", json={"inputs": SENTENCES}).json())
        alone = np.array([client.post("/embed", json={"inputs": text}).json()[0] for text in SENTENCES])
        openai_shape = client.post("/v1/embeddings", json={"input": SENTENCES}).json()
    assert info["max_input_length"] == 256  # sentence_bert_config.json's max_seq_length
    assert np.abs(together - expected).max() <= 1e-5
    assert np.abs(alone - expected).max() <= 1e-5
    assert np.abs(np.array([item["embedding"] for item in openai_shape["data"]]) - expected).max() <= 1e-5
