"""Every error the server answers: 413, 422, 401, 429, 500 (with the request id), 400/404, in TEI's
JSON shape, and the server keeps serving after each."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve._control import held_forward, serving_of, wait_until
from tests.serve.conftest import TEXTS, serve


def _assert_error(response, status: int, error_type: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type and body["error"]
    assert body["request_id"] == response.headers["x-request-id"]
    if field is not None:
        assert body["field"] == field
    return body


def test_input_over_the_length_limit_is_413_with_the_numbers(embed_client, embed_dir):
    text = " ".join(["word"] * 100)  # 102 tokens with [CLS] and [SEP]; the limit is 64
    response = embed_client.post("/embed", json={"inputs": ["ok", text], "truncate": False})
    body = _assert_error(response, 413, "Validation", "inputs")
    assert "inputs[1]" in body["error"] and "102" in body["error"] and "64" in body["error"]
    assert embed_client.post("/embed", json={"inputs": ["ok", text]}).status_code == 200  # --auto-truncate's default
    with serve(embed_dir, auto_truncate=False) as strict:
        _assert_error(strict.post("/embed", json={"inputs": ["ok", text]}), 413, "Validation", "inputs")
        assert strict.post("/embed", json={"inputs": ["ok", text], "truncate": True}).status_code == 200


def test_too_many_inputs_is_413(embed_client):
    body = _assert_error(embed_client.post("/embed", json={"inputs": ["a"] * 33}), 413, "Validation", "inputs")
    assert "33" in body["error"] and "32" in body["error"]


def test_body_over_the_payload_limit_is_413(embed_dir):
    with serve(embed_dir, payload_limit=1000) as client:
        _assert_error(client.post("/embed", json={"inputs": "x" * 2000}), 413, "Validation")

        def chunks():  # no Content-Length: the limit applies while the body streams in
            yield b'{"inputs": "'
            yield b"x" * 2000
            yield b'"}'

        _assert_error(client.post("/embed", content=chunks(), headers={"content-type": "application/json"}),
                      413, "Validation")
        assert client.post("/embed", json={"inputs": "fits"}).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"inputs": []}, "inputs"),
    ({"inputs": ""}, "inputs"),
    ({"inputs": ["a", ""]}, "inputs[1]"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": [1, 2]}, "inputs"),
    ({"normalize": True}, "inputs"),
    ({"inputs": "a", "truncation_direction": "Up"}, "truncation_direction"),
    ({"inputs": "a", "dimensions": 0}, "dimensions"),
    ({"inputs": "a", "prompt_name": "query"}, "prompt_name"),
])
def test_bad_embed_bodies_are_422_naming_the_field(embed_client, body, field):
    _assert_error(embed_client.post("/embed", json=body), 422, "Validation", field)


def test_bad_json_is_422(embed_client):
    response = embed_client.post("/embed", content=b'{"inputs": [', headers={"content-type": "application/json"})
    body = _assert_error(response, 422, "Validation", "body")
    assert "JSON" in body["error"]


@pytest.mark.parametrize("path, body, field", [
    ("/rerank", {"query": "q", "texts": []}, "texts"),
    ("/rerank", {"query": "", "texts": ["a"]}, "query"),
    ("/rerank", {"texts": ["a"]}, "query"),
])
def test_bad_rerank_bodies_are_422(reranker_client, path, body, field):
    _assert_error(reranker_client.post(path, json=body), 422, "Validation", field)


def test_api_key(embed_dir):
    with serve(embed_dir, api_key="secret") as client:
        _assert_error(client.post("/embed", json={"inputs": "a"}), 401, "Unauthorized")
        _assert_error(client.post("/embed", json={"inputs": "a"}, headers={"authorization": "Bearer wrong"}),
                      401, "Unauthorized")
        _assert_error(client.get("/metrics"), 401, "Unauthorized")
        assert client.get("/health").status_code == 200  # probes need no key
        ok = client.post("/embed", json={"inputs": "a"}, headers={"authorization": "Bearer secret"})
        assert ok.status_code == 200


def test_full_queue_is_429_with_retry_after_then_recovers(embed_dir):
    with serve(embed_dir, max_concurrent_requests=2) as client, ThreadPoolExecutor(2) as pool:
        serving = serving_of(client)
        with held_forward(client):
            admitted = [pool.submit(client.post, "/embed", json={"inputs": text}) for text in TEXTS[:2]]
            wait_until(lambda: serving.limit.in_flight == 2)
            refused = client.post("/embed", json={"inputs": "third"})
            _assert_error(refused, 429, "Overloaded")
            assert refused.headers["retry-after"] == "1"
        assert [future.result().status_code for future in admitted] == [200, 200]
        assert client.post("/embed", json={"inputs": "third"}).status_code == 200


def test_overload_twice_the_queue_gives_only_200_and_429(embed_dir):
    limit = 4
    with serve(embed_dir, max_concurrent_requests=limit) as client, ThreadPoolExecutor(2 * limit) as pool:
        serving = serving_of(client)
        with held_forward(client):
            futures = [pool.submit(client.post, "/embed", json={"inputs": TEXTS[i % len(TEXTS)]})
                       for i in range(2 * limit)]
            wait_until(lambda: serving.limit.in_flight == limit and sum(f.done() for f in futures) == limit)
        statuses = sorted(future.result(timeout=60).status_code for future in futures)
    assert statuses == [200] * limit + [429] * limit


def test_a_failing_forward_fails_only_its_batch(embed_dir):
    long_text = " ".join(["many"] * 40)  # two of these do not fit in 64 tokens: separate forwards
    with serve(embed_dir, max_batch_tokens=64) as client, ThreadPoolExecutor(2) as pool:
        serving = serving_of(client)
        marker = serving.engine.tokenize(["boom"], truncate=False)[0].input_ids[1]
        forward = serving.engine.forward

        def failing_forward(batch):
            if any(marker in item.input_ids for item in batch):
                raise RuntimeError("injected failure")
            return forward(batch)

        serving.engine.forward = failing_forward
        with held_forward(client):  # both requests queue before either runs
            bad = pool.submit(client.post, "/embed", json={"inputs": "boom " + long_text},
                              headers={"x-request-id": "req-bad-1"})
            good = pool.submit(client.post, "/embed", json={"inputs": long_text})
            wait_until(lambda: serving.limit.in_flight == 2)
        body = _assert_error(bad.result(), 500, "Backend")
        assert body["request_id"] == "req-bad-1" and "injected failure" in body["error"]
        assert good.result().status_code == 200
        assert client.post("/embed", json={"inputs": "after"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_an_unexpected_exception_is_500_with_the_request_id(embed_client):
    serving = serving_of(embed_client)

    def broken(*args):
        raise KeyError("unexpected")

    serving.engine.tokenize = broken
    try:
        _assert_error(embed_client.post("/embed", json={"inputs": "a"}), 500, "Backend")
    finally:
        del serving.engine.tokenize
    assert embed_client.post("/embed", json={"inputs": "a"}).status_code == 200


def test_unknown_route_and_method(embed_client):
    _assert_error(embed_client.get("/nope"), 404, "Validation")
    _assert_error(embed_client.get("/embed"), 405, "Validation")


def test_metrics_count_requests_by_status(embed_client):
    embed_client.post("/embed", json={"inputs": []})
    embed_client.post("/embed", json={"inputs": "counted"})
    text = embed_client.get("/metrics").text
    assert 'fastbert_requests_total{endpoint="/embed",status="422"}' in text
    assert 'fastbert_requests_total{endpoint="/embed",status="200"}' in text
    for name in ("fastbert_queue_size", "fastbert_batch_tokens_bucket", "fastbert_batch_size_bucket",
                 "fastbert_tokenize_seconds_bucket", "fastbert_queue_seconds_bucket",
                 "fastbert_inference_seconds_bucket"):
        assert name in text
