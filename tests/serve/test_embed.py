"""/embed, /v1/embeddings and /tokenize: TEI's (and OpenAI's) response shapes, values against transformers."""
import base64
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.serve._reference import reference_embeddings
from tests.serve.conftest import TEXTS

TOLERANCE = 1e-5


def test_embed_list_matches_transformers_in_order(embed_client, embed_dir):
    response = embed_client.post("/embed", json={"inputs": TEXTS})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    values = torch.tensor(response.json())
    assert values.shape == (len(TEXTS), 32)
    assert (values - reference_embeddings(embed_dir, TEXTS)).abs().max() <= TOLERANCE


def test_embed_single_string_is_a_list_of_one(embed_client, embed_dir):
    values = embed_client.post("/embed", json={"inputs": TEXTS[1]}).json()
    assert isinstance(values, list) and len(values) == 1 and len(values[0]) == 32
    assert (torch.tensor(values) - reference_embeddings(embed_dir, TEXTS[1:2])).abs().max() <= TOLERANCE


def test_embed_normalize_false_returns_the_pooled_vector(embed_client, embed_dir):
    values = torch.tensor(embed_client.post("/embed", json={"inputs": TEXTS, "normalize": False}).json())
    reference = reference_embeddings(embed_dir, TEXTS, normalize=False)
    assert (values - reference).abs().max() <= TOLERANCE
    assert not torch.allclose(values.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-3)


def test_embed_dimensions_cut_then_normalize(embed_client, embed_dir):
    values = torch.tensor(embed_client.post("/embed", json={"inputs": TEXTS, "dimensions": 8}).json())
    reference = torch.nn.functional.normalize(reference_embeddings(embed_dir, TEXTS, normalize=False)[:, :8], dim=1)
    assert values.shape == (len(TEXTS), 8)
    assert (values - reference).abs().max() <= TOLERANCE


@pytest.mark.parametrize("direction", ["Right", "Left"])
def test_embed_truncate_matches_tokenizer_truncation(embed_client, embed_dir, direction):
    text = " ".join(f"word{i}" for i in range(200))
    response = embed_client.post("/embed", json={"inputs": [text], "truncate": True,
                                                 "truncation_direction": direction})
    assert response.status_code == 200
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(embed_dir)
    tokenizer.truncation_side = direction.lower()
    model = transformers.BertModel.from_pretrained(embed_dir).eval()
    batch = tokenizer([text], truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        reference = torch.nn.functional.normalize(model(**batch).last_hidden_state.mean(1), dim=1)
    assert (torch.tensor(response.json()) - reference).abs().max() <= TOLERANCE


def test_openai_shape_float_and_base64(embed_client, embed_dir):
    body = {"input": TEXTS[:3], "model": "tiny"}
    floats = embed_client.post("/v1/embeddings", json=body).json()
    assert floats["object"] == "list" and floats["model"] == Path(embed_dir).name  # TEI: the served name
    assert [item["index"] for item in floats["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in floats["data"])
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 3
    encoded = embed_client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in encoded["data"]])
    assert np.array_equal(decoded, np.array([item["embedding"] for item in floats["data"]], dtype=np.float32))
    assert (torch.tensor(decoded) - reference_embeddings(embed_dir, TEXTS[:3])).abs().max() <= TOLERANCE


def test_openai_python_client(embed_client, embed_dir):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    client = openai.OpenAI(base_url=f"{embed_client.base_url}/v1", api_key="unused", http_client=embed_client)
    result = client.embeddings.create(input=TEXTS[:2], model="tiny")  # the client asks for base64 by default
    values = torch.tensor([item.embedding for item in result.data])
    assert (values - reference_embeddings(embed_dir, TEXTS[:2])).abs().max() <= TOLERANCE
    assert result.usage.total_tokens > 0


def test_openai_token_arrays_are_refused_naming_the_field(embed_client):
    response = embed_client.post("/v1/embeddings", json={"input": [[101, 102]]})
    assert response.status_code == 422 and response.json()["field"] == "input"


def test_tokenize_shape(embed_client, embed_dir):
    tokens = embed_client.post("/tokenize", json={"inputs": ["Hello world", "fastbert"]}).json()
    assert len(tokens) == 2
    first = tokens[0]
    assert [t["special"] for t in first] == [True, False, False, True]
    assert first[1] == {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5}
    assert first[0]["text"] == "[CLS]" and first[0]["start"] is None
    bare = embed_client.post("/tokenize", json={"inputs": "Hello world", "add_special_tokens": False}).json()
    assert [t["id"] for t in bare[0]] == [t["id"] for t in first[1:-1]]


def test_embed_on_a_classifier_is_refused(classifier_client):
    response = classifier_client.post("/embed", json={"inputs": "x"})
    assert response.status_code == 400 and response.json()["error_type"] == "Validation"
