"""The Ray Serve deployment on a local Ray instance (skipped when ray[serve] is not installed)."""

import httpx
import pytest

from fastbert.serve import ServeOptions
from tests.serve._control import free_port

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'fastbert[serve-ray]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'fastbert[serve-ray]')")


@pytest.mark.slow
def test_ray_serve_deployment_answers_like_the_app(embed_dir):
    from fastbert.serve.ray import build_app
    from tests.serve._reference import reference_embeddings

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeOptions(embed_dir), num_replicas=2, cpus_per_replica=0.5), route_prefix="/",
                  name="fastbert-test")
        texts = ["ray replica one", "and a second, longer text for the other replica"]
        responses = [httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": texts}, timeout=60)
                     for _ in range(4)]
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=60)
        error = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": []}, timeout=60)
    finally:
        serve.shutdown()
        ray.shutdown()
    assert health.status_code == 200
    assert all(response.status_code == 200 for response in responses)
    import torch

    reference = reference_embeddings(embed_dir, texts)
    assert all((torch.tensor(r.json()) - reference).abs().max() <= 1e-5 for r in responses)
    assert error.status_code == 422 and error.json()["field"] == "inputs"
