"""/predict and /rerank on sequence-classification checkpoints: TEI's shapes, labels from id2label,
scores against transformers' logits."""

from fastbert.cpu import allocator
from tests.serve._reference import reference_logits
from tests.serve.conftest import TEXTS

TOLERANCE = 1e-5


def _by_label(entries: list[dict]) -> dict:
    return {entry["label"]: entry["score"] for entry in entries}


def test_predict_single_text_sorted_softmax(classifier_client, classifier_dir):
    entries = classifier_client.post("/predict", json={"inputs": TEXTS[1]}).json()
    assert [set(entry) for entry in entries] == [{"score", "label"}] * 3
    assert [entry["score"] for entry in entries] == sorted((entry["score"] for entry in entries), reverse=True)
    expected = reference_logits(classifier_dir, TEXTS[1:2])[0].softmax(-1)
    scores = _by_label(entries)
    assert max(abs(scores[label] - expected[i].item()) for i, label in enumerate(["negative", "neutral", "positive"])
               ) <= TOLERANCE


def test_predict_pair_and_batch(classifier_client, classifier_dir):
    pair = classifier_client.post("/predict", json={"inputs": [TEXTS[0], TEXTS[1]], "raw_scores": True}).json()
    expected = reference_logits(classifier_dir, TEXTS[:1], TEXTS[1:2])[0]
    assert abs(_by_label(pair)["positive"] - expected[2].item()) <= TOLERANCE
    batch = classifier_client.post("/predict", json={"inputs": [TEXTS[2], [TEXTS[0], TEXTS[1]], TEXTS[3]],
                                                     "raw_scores": True}).json()
    assert len(batch) == 3 and all(len(entries) == 3 for entries in batch)
    assert abs(_by_label(batch[1])["neutral"] - expected[1].item()) <= TOLERANCE
    singles = reference_logits(classifier_dir, [TEXTS[2], TEXTS[3]])
    assert abs(_by_label(batch[0])["negative"] - singles[0, 0].item()) <= TOLERANCE
    assert abs(_by_label(batch[2])["negative"] - singles[1, 0].item()) <= TOLERANCE


def test_predict_pair_of_wrong_length_names_the_item(classifier_client):
    response = classifier_client.post("/predict", json={"inputs": ["a", ["b", "c", "d"]]})
    assert response.status_code == 422 and response.json()["field"] == "inputs[1]"


def test_rerank_sorted_with_indices_and_text(reranker_client, reranker_dir):
    query, texts = "what packs requests?", TEXTS
    results = reranker_client.post("/rerank", json={"query": query, "texts": texts, "return_text": True}).json()
    expected = reference_logits(reranker_dir, [query] * len(texts), texts)[:, 0].sigmoid()
    assert sorted(entry["index"] for entry in results) == list(range(len(texts)))
    assert [entry["score"] for entry in results] == sorted((entry["score"] for entry in results), reverse=True)
    for entry in results:
        assert entry["text"] == texts[entry["index"]]
        assert abs(entry["score"] - expected[entry["index"]].item()) <= TOLERANCE


def test_rerank_raw_scores_without_text(reranker_client, reranker_dir):
    results = reranker_client.post("/rerank", json={"query": "q", "texts": TEXTS[:2], "raw_scores": True}).json()
    expected = reference_logits(reranker_dir, ["q", "q"], TEXTS[:2])[:, 0]
    assert all(set(entry) == {"index", "score"} for entry in results)
    assert max(abs(entry["score"] - expected[entry["index"]].item()) for entry in results) <= TOLERANCE


def test_rerank_needs_one_label(classifier_client):
    response = classifier_client.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert response.status_code == 400 and "one label" in response.json()["error"]


def test_info_reports_the_model_kind(classifier_client, reranker_client, embed_client):
    classifier = classifier_client.get("/info").json()
    assert classifier["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert reranker_client.get("/info").json()["model_type"]["reranker"]["label2id"] == {"relevant": 0}
    embed = embed_client.get("/info").json()
    assert embed["model_type"] == {"embedding": {"pooling": "mean"}}
    assert embed["max_input_length"] == 64 and embed["max_batch_tokens"] == 16384
    assert embed["model_dtype"] == "float32"
    if allocator.problem() is None:  # glibc: the server process kept freed memory at start
        assert embed["allocator"] == allocator.state() and allocator.is_kept()


def test_predict_on_an_embedding_model_is_refused(embed_client):
    assert embed_client.post("/predict", json={"inputs": "x"}).status_code == 400
    assert embed_client.get("/health").status_code == 200
