"""The batcher: a bounded admission count, a queue of sequences, and one inference thread.

Each request's sequences enter the queue as separate items. The inference thread takes the oldest
waiting item (so no sequence waits forever) and then the shortest others while their real tokens fit in
max_batch_tokens (and the padded output buffer, batch x longest, fits in PADDED_SLACK times that),
runs one forward on them sorted shortest first, and writes each row back to its request at its
index: a client batch split over several forwards is reassembled in order. An exception in a forward
fails the requests that had an item in it and nothing else.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PADDED_SLACK = 4


class Overloaded(RuntimeError):
    """More requests in flight than --max-concurrent-requests."""


class BatchFailed(RuntimeError):
    """The forward holding one of this request's sequences raised."""


class AdmissionLimit:
    """Counts the requests in flight (tokenizing, waiting or running); over the limit, Overloaded at once.
    Used from the event loop thread only, so a plain counter is enough."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def __enter__(self):
        if self.in_flight >= self.limit:
            raise Overloaded(f"{self.in_flight} requests in flight, the limit is {self.limit}")
        self.in_flight += 1
        return self

    def __exit__(self, *exc_info):
        self.in_flight -= 1


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list
    remaining: int
    failed: bool = False


@dataclass
class _Item:
    request: _Request
    index: int
    sequence: object  # anything with len(): engine.Encoded
    length: int
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """run_batch(sequences) -> a tensor with one row per sequence, called on the inference thread only."""

    def __init__(self, run_batch: Callable, max_batch_tokens: int, batching: bool = True, metrics=None):
        self.run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        self.metrics = metrics
        self._waiting: list[_Item] = []  # arrival order
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- event loop side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve_forever, name="fastbert-inference", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def submit(self, sequences: list) -> list[torch.Tensor]:
        """One row per sequence, in the order given."""
        loop = asyncio.get_running_loop()
        request = _Request(loop, loop.create_future(), [None] * len(sequences), len(sequences))
        items = [_Item(request, index, seq, len(seq)) for index, seq in enumerate(sequences)]
        with self._condition:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._waiting.extend(items)
            self._set_queue_metric()
            self._condition.notify()
        return await request.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued sequence, then end the inference thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- inference thread -----------------------------------------------------------------------

    def _serve_forever(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if not self._waiting:
                    return
                batch = self._take()
                self._set_queue_metric()
            if batch:
                self._run(batch)

    def _take(self) -> list[_Item]:
        """Remove and return the next forward's items, shortest first (caller holds the condition)."""
        self._waiting = [item for item in self._waiting if not item.request.failed]
        if not self._waiting:
            return []
        oldest = self._waiting[0]
        if not self.batching:
            chosen = [item for item in self._waiting if item.request is oldest.request]
        else:
            chosen = self._fill(oldest, sorted(self._waiting[1:], key=lambda item: item.length))
        taken = set(map(id, chosen))
        self._waiting = [item for item in self._waiting if id(item) not in taken]
        return sorted(chosen, key=lambda item: item.length)

    def _fill(self, oldest: _Item, shortest_first: list[_Item]) -> list[_Item]:
        chosen, tokens, longest = [oldest], oldest.length, oldest.length
        for item in shortest_first:
            longest_after = max(longest, item.length)
            if (tokens + item.length > self.max_batch_tokens
                    or longest_after * (len(chosen) + 1) > PADDED_SLACK * self.max_batch_tokens):
                break
            chosen.append(item)
            tokens, longest = tokens + item.length, longest_after
        return chosen

    def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            rows = self.run_batch([item.sequence for item in batch])
        except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
            self._fail({id(item.request): item.request for item in batch}.values(), exc)
            return
        if self.metrics is not None:
            self.metrics.observe_batch(batch, started, time.perf_counter())
        for item, row in zip(batch, rows):
            self._deliver(item, row)

    def _deliver(self, item: _Item, row: torch.Tensor) -> None:
        request = item.request
        if request.failed:
            return
        request.results[item.index] = row
        request.remaining -= 1
        if request.remaining == 0:
            request.loop.call_soon_threadsafe(_resolve, request.future, request.results)

    def _fail(self, requests, exc: Exception) -> None:
        for request in requests:
            request.failed = True
            error = BatchFailed(f"the forward failed: {type(exc).__name__}: {exc}")
            request.loop.call_soon_threadsafe(_reject, request.future, error)

    def _set_queue_metric(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_size.set(len(self._waiting))


def _resolve(future: asyncio.Future, results: list) -> None:
    if not future.done():
        future.set_result(results)


def _reject(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
