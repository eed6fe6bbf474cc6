"""Concurrency: inference from several threads on one model equals serial inference.

fastbert caches a fused QKV weight on each attention module in no-grad mode
(fastbert.models.fused_qkv.fused_parameters): threads race to fill it. The cache entry is one tuple assigned in
one statement, keyed by the parameters' (data_ptr, version), so a thread sees either no entry or a
complete one; the worst case is that two threads both build it.
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert.models.encoder import clear_fused_qkv_cache
from tests.helpers import random_batch, run_every_batch_in_threads, small_config

THREADS = 4


def _batches(count):
    config = small_config()
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(count):
        seqlen = 4 + (i * 5) % 29
        lengths = torch.randint(0, seqlen + 1, (3,), generator=g)
        out.append(random_batch(config, 3, seqlen, lengths=lengths, generator=g))
    return out


def _infer(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("cold_cache", [True, False], ids=["cold-qkv-cache", "warm-qkv-cache"])
def test_threads_match_serial(cpu_backend, cold_cache):
    torch.manual_seed(0)
    model = fastbert.BertModel(small_config()).eval()
    batches = _batches(24)
    serial = [_infer(model, batch) for batch in batches]
    if cold_cache:  # every thread races to build the fused QKV weights
        clear_fused_qkv_cache(model)
    results = run_every_batch_in_threads(lambda batch: _infer(model, batch), batches, THREADS)
    for per_thread in results:
        for i, (hidden, pooled) in per_thread.items():
            assert torch.equal(hidden, serial[i][0]), f"batch {i}"
            assert torch.equal(pooled, serial[i][1]), f"batch {i}"


def test_fused_qkv_cache_follows_weight_updates_between_calls():
    """An in-place weight update (e.g. an optimizer step) bumps the version: no stale fused weight."""
    torch.manual_seed(0)
    model = fastbert.BertModel(small_config()).eval()
    batch = _batches(1)[0]
    before = _infer(model, batch)[0]
    with torch.no_grad():
        model.encoder.layer[0].attention.self.key.weight.mul_(2.0)
    after = _infer(model, batch)[0]
    clear_fused_qkv_cache(model)
    assert not torch.equal(before, after)
    assert torch.equal(after, _infer(model, batch)[0])
