"""A Ray Serve deployment of the same app: N replicas (or autoscaling), each with its own batcher.

    pip install 'fastbert[serve-ray]'
    from fastbert.serve.ray import build_app
    serve.run(build_app(ServeOptions("path/to/model"), num_replicas=4), route_prefix="/")

Each replica builds the FastAPI app in its own process (Ray's deferred ingress), so the model loads
once per replica; Ray Serve's proxy routes HTTP to the replicas. docs/serve.md has the multi-node
commands. This module shadows nothing: `import ray` below is the top-level Ray package.
"""
from __future__ import annotations

import dataclasses

from ray import serve

from fastbert.serve.options import ServeOptions


@serve.ingress()
class FastbertReplica:
    """One replica: the app of fastbert.serve.app for the options it was bound with."""

    def __init__(self, options: dict):
        self._options = ServeOptions(**options)

    def __serve_build_asgi_app__(self):
        from fastbert.serve.app import create_app

        return create_app(self._options)


def build_app(options: ServeOptions, num_replicas: int | None = 1, autoscaling_config: dict | None = None,
              cpus_per_replica: float = 1.0, max_ongoing_requests: int | None = None):
    """A Ray Serve Application: `num_replicas` fixed replicas, or `autoscaling_config`
    (e.g. {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 64}) with num_replicas=None."""
    if (num_replicas is None) == (autoscaling_config is None):
        raise ValueError("give exactly one of num_replicas and autoscaling_config")
    settings = {"ray_actor_options": {"num_cpus": cpus_per_replica},
                # Ray's own admission must not refuse what the replica's batcher would still accept
                "max_ongoing_requests": max_ongoing_requests or options.max_concurrent_requests}
    if num_replicas is not None:
        settings["num_replicas"] = num_replicas
    else:
        settings["autoscaling_config"] = autoscaling_config
    deployment = serve.deployment(FastbertReplica, name="fastbert", **settings)
    return deployment.bind(dataclasses.asdict(options))
