"""Many clients at once through the whole app: every answer is the embedding of its own texts, in order."""
import random
from concurrent.futures import ThreadPoolExecutor

import torch

from tests.serve._control import held_forward, serving_of, wait_until
from tests.serve._reference import reference_embeddings
from tests.serve.conftest import serve

WORDS = "alpha beta gamma delta packing tokens forward batch server queue order client".split()


def _texts(rng: random.Random) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(rng.randint(1, 4))]


def test_concurrent_requests_get_their_own_embeddings_in_order(embed_dir):
    rng = random.Random(0)
    bodies = [_texts(rng) for _ in range(48)]
    with serve(embed_dir, max_batch_tokens=256) as client, ThreadPoolExecutor(16) as pool:
        serving = serving_of(client)
        with held_forward(client):  # the first 16 requests queue up together, then everything flows
            futures = [pool.submit(client.post, "/embed", json={"inputs": texts}) for texts in bodies]
            wait_until(lambda: serving.limit.in_flight == 16)
        responses = [future.result() for future in futures]
        metrics = client.get("/metrics").text
    assert all(response.status_code == 200 for response in responses)
    everything = [text for texts in bodies for text in texts]
    reference = reference_embeddings(embed_dir, everything)
    answers = torch.tensor([row for response in responses for row in response.json()])
    assert answers.shape == reference.shape
    assert (answers - reference).abs().max() <= 1e-5
    forwards = float(next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("fastbert_batch_size_count")))
    assert forwards <= len(bodies) - 10  # the held-up requests went into few forwards (+1: the warm-up)
