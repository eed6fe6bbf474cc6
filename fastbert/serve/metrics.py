"""Prometheus metrics of one server process, in a registry of its own (several apps in one process,
as in the tests, do not collide). With --workers N each worker reports its own numbers."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKENS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.queue_size = Gauge("fastbert_queue_size", "Sequences waiting for a forward", registry=registry)
        self.in_flight = Gauge("fastbert_requests_in_flight", "Requests admitted and not yet answered",
                               registry=registry)
        self.batch_tokens = Histogram("fastbert_batch_tokens", "Real tokens per forward", buckets=TOKENS,
                                      registry=registry)
        self.batch_size = Histogram("fastbert_batch_size", "Sequences per forward", buckets=SIZES,
                                    registry=registry)
        self.tokenize_seconds = Histogram("fastbert_tokenize_seconds", "Tokenization time per request",
                                          buckets=SECONDS, registry=registry)
        self.queue_seconds = Histogram("fastbert_queue_seconds", "Time a sequence waits for its forward",
                                       buckets=SECONDS, registry=registry)
        self.inference_seconds = Histogram("fastbert_inference_seconds", "Time of one forward", buckets=SECONDS,
                                           registry=registry)
        self.requests = Counter("fastbert_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=registry)

    def observe_batch(self, batch, started: float, finished: float) -> None:
        """Called by the batcher after each successful forward (items carry .length and .enqueued)."""
        self.batch_size.observe(len(batch))
        self.batch_tokens.observe(sum(item.length for item in batch))
        self.inference_seconds.observe(finished - started)
        for item in batch:
            self.queue_seconds.observe(started - item.enqueued)

    def render(self) -> bytes:
        return generate_latest(self.registry)
