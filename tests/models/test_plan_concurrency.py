"""Inference plans under concurrency: threads share a plan; training in one thread does not take the
fast path from another (training or inference is decided per forward, per thread)."""
from __future__ import annotations

import threading

import torch

import fastbert
from fastbert import backend
from fastbert.models import plan
from tests.helpers import random_batch, run_every_batch_in_threads, small_config

THREADS = 4


def _batches(config, count):
    g = torch.Generator().manual_seed(3)
    batches = []
    for i in range(count):
        seqlen = 3 + (i * 7) % 23
        lengths = torch.randint(1, seqlen + 1, (1 + i % 3,), generator=g)
        batches.append(random_batch(config, len(lengths), seqlen, lengths=lengths, generator=g))
    return batches


def _infer(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _spy_runs(monkeypatch):
    """Thread ids of the forwards that ran a plan."""
    runs = []
    original = plan.Plan.run
    monkeypatch.setattr(plan.Plan, "run", lambda self, *a: runs.append(threading.get_ident()) or original(self, *a))
    return runs


def test_four_threads_with_different_shapes_match_serial(monkeypatch):
    torch.manual_seed(0)
    config = small_config()
    model = fastbert.BertModel(config).eval()
    batches = _batches(config, 16)
    serial = [_infer(model, batch) for batch in batches]
    plan.forget_plans(model)  # the threads race to build the plan
    runs = _spy_runs(monkeypatch)
    results = run_every_batch_in_threads(lambda batch: _infer(model, batch), batches, THREADS)
    for per_thread in results:
        for i, hidden in per_thread.items():
            assert torch.equal(hidden, serial[i]), f"batch {i}"
    assert len(runs) == THREADS * len(batches)  # every forward ran a plan


def test_inference_beside_training_keeps_the_fast_path(monkeypatch):
    torch.manual_seed(0)
    config = small_config()
    serving = fastbert.BertModel(config).eval()
    training = fastbert.BertForMaskedLM(config).train()
    optimizer = torch.optim.SGD(training.parameters(), lr=1e-3)
    batches = _batches(config, 12)
    serial = [_infer(serving, batch) for batch in batches]
    runs = _spy_runs(monkeypatch)
    stop = threading.Event()
    losses = []

    def train():
        batch = random_batch(config, 2, 12)
        while not stop.is_set():
            loss = training(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        served = [_infer(serving, batch) for batch in batches for _ in range(3)]
    finally:
        stop.set()
        trainer.join()
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    me = threading.get_ident()
    assert runs.count(me) == len(served)  # no inference forward lost its plan to the training thread
    assert trainer.ident not in runs
    for i, hidden in enumerate(served):
        assert torch.equal(hidden, serial[i // 3])


def test_training_forward_is_per_thread():
    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def trainer():
        with backend.training_forward():
            seen["trainer"] = backend.records_autograd()
            inside.set()
            outside.wait()

    thread = threading.Thread(target=trainer)
    thread.start()
    inside.wait()
    seen["other"] = backend.records_autograd()
    outside.set()
    thread.join()
    assert seen == {"trainer": True, "other": False}
    assert not hasattr(backend, "_training_forwards")
