"""The batcher on its own (a fake forward that records its batches): packing within the token budget,
shortest first, the oldest sequence never starved, split and reassembly in order, failure isolation."""
import asyncio

import pytest
import torch

from fastbert.serve.batcher import PADDED_SLACK, AdmissionLimit, Batcher, BatchFailed, Overloaded


class Seq:
    """A fake sequence: a length and an identity."""

    def __init__(self, name: str, length: int):
        self.name, self.length = name, length

    def __len__(self):
        return self.length


class Recorder:
    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[Seq]] = []
        self.fail_on = fail_on

    def __call__(self, batch):
        self.batches.append(list(batch))
        if self.fail_on and any(seq.name.startswith(self.fail_on) for seq in batch):
            raise RuntimeError("injected")
        return torch.tensor([[float(seq.length), float(hash(seq.name) % 1000)] for seq in batch])


def _requests(count: int, per_request: int, generator: torch.Generator) -> list[list[Seq]]:
    return [[Seq(f"r{r}s{s}", int(torch.randint(2, 60, (), generator=generator))) for s in range(per_request)]
            for r in range(count)]


def _run(batcher: Batcher, requests):
    """Queue every request before the inference thread starts, so the batches are deterministic."""
    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(request)) for request in requests]
        await asyncio.sleep(0)  # every submit has queued its items
        batcher.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        return asyncio.run(main())
    finally:
        batcher.stop()


def test_split_and_reassembly_in_order():
    generator = torch.Generator().manual_seed(0)
    requests = _requests(12, 7, generator)
    recorder = Recorder()
    results = _run(Batcher(recorder, max_batch_tokens=100), requests)
    for request, rows in zip(requests, results):
        expected = [[float(seq.length), float(hash(seq.name) % 1000)] for seq in request]
        assert [row.tolist() for row in rows] == expected
    seen = [seq.name for batch in recorder.batches for seq in batch]
    assert sorted(seen) == sorted(seq.name for request in requests for seq in request)  # none lost or doubled
    assert any(len({seq.name.split("s")[0] for seq in batch}) > 1 for batch in recorder.batches)  # requests mix
    assert any(len({seq.name for seq in batch if seq.name.startswith("r0s")}) not in (0, 7)
               for batch in recorder.batches)  # request 0 was split over forwards


def test_batches_fit_the_budget_shortest_first_oldest_included():
    generator = torch.Generator().manual_seed(1)
    requests = _requests(20, 4, generator)
    recorder = Recorder()
    _run(Batcher(recorder, max_batch_tokens=120), requests)
    for batch in recorder.batches:
        lengths = [seq.length for seq in batch]
        assert lengths == sorted(lengths)
        assert sum(lengths) <= 120 or len(batch) == 1
        assert max(lengths) * len(batch) <= PADDED_SLACK * 120
    assert "r0s0" in {seq.name for seq in recorder.batches[0]}  # the oldest sequence goes first


def test_one_sequence_over_the_budget_still_runs_alone():
    recorder = Recorder()
    results = _run(Batcher(recorder, max_batch_tokens=10), [[Seq("big", 50)], [Seq("small", 3)]])
    assert [len(rows) for rows in results] == [1, 1]
    assert [seq.name for seq in recorder.batches[0]] == ["big"]


def test_padded_buffer_is_bounded():
    recorder = Recorder()
    requests = [[Seq("long", 100)]] + [[Seq(f"short{i}", 2)] for i in range(50)]
    _run(Batcher(recorder, max_batch_tokens=200), requests)
    first = recorder.batches[0]
    assert first[-1].name == "long" and 100 * len(first) <= PADDED_SLACK * 200


def test_batching_off_is_one_forward_per_request():
    generator = torch.Generator().manual_seed(2)
    requests = _requests(6, 3, generator)
    recorder = Recorder()
    _run(Batcher(recorder, max_batch_tokens=10_000, batching=False), requests)
    assert len(recorder.batches) == 6
    assert all(len({seq.name.split("s")[0] for seq in batch}) == 1 for batch in recorder.batches)


def test_a_failing_forward_fails_only_the_requests_in_it():
    requests = [[Seq("bad0", 30), Seq("bad1", 30)], [Seq("good0", 30), Seq("good1", 30)], [Seq("shares", 5)],
                [Seq("other", 15)]]
    recorder = Recorder(fail_on="bad")
    results = _run(Batcher(recorder, max_batch_tokens=40), requests)
    assert [seq.name for seq in recorder.batches[0]] == ["shares", "bad0"]
    assert isinstance(results[0], BatchFailed) and "injected" in str(results[0])
    assert isinstance(results[2], BatchFailed)  # it shared the failing forward
    assert [row[0].item() for row in results[1]] == [30.0, 30.0]
    assert len(results[3]) == 1
    names = [seq.name for batch in recorder.batches for seq in batch]
    assert names.count("bad1") <= 1  # a failed request's remaining sequences are dropped, not run


def test_stop_finishes_what_is_queued():
    recorder = Recorder()

    async def main():
        batcher = Batcher(recorder, max_batch_tokens=50)
        tasks = [asyncio.ensure_future(batcher.submit([Seq(f"q{i}", 20)])) for i in range(5)]
        await asyncio.sleep(0)
        batcher.start()
        await asyncio.to_thread(batcher.stop)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert [len(rows) for rows in results] == [1] * 5


def test_admission_limit():
    limit = AdmissionLimit(2)
    with limit, limit:
        with pytest.raises(Overloaded, match="limit is 2"):
            with limit:
                pass
    assert limit.in_flight == 0
