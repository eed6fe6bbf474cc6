"""Hooks on a running app's engine (hold the forward until released, or make it raise on a marker), and
helpers for a real server process."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import httpx


def serving_of(client):
    return client.app.state.serving


@contextmanager
def held_forward(client):
    """Every forward waits until the block exits (the requests pile up in flight)."""
    serving = serving_of(client)
    gate = threading.Event()
    forward = serving.engine.forward

    def waiting_forward(batch):
        gate.wait(30)
        return forward(batch)

    shadowed = serving.engine.__dict__.get("forward")
    serving.engine.forward = waiting_forward
    try:
        yield gate
    finally:
        gate.set()
        if shadowed is None:
            del serving.engine.forward  # back to the class's method
        else:
            serving.engine.forward = shadowed


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until GET /health answers 200; the process must not exit meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited during startup"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become healthy")
