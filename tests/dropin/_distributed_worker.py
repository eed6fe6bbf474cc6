"""Worker for the 2-process CPU tests (torch.multiprocessing spawn, gloo): DDP and FSDP on a patched model.

Each rank builds the same tiny BertForSequenceClassification (same seed), patches it, wraps it, runs
its half of the batch, and rank 0 saves the gradients (full, unsharded) to `out_path`.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import transformers

import fastbert
from tests.helpers import random_batch, small_config


def build_model_and_batch():
    config = small_config()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).train()
    batch = random_batch(config, 4, 10, lengths=[10, 3, 7, 5], generator=torch.Generator().manual_seed(5))
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    return model, batch


def _grads(model, full=False):
    return {
        n: (p.grad.full_tensor() if full else p.grad).detach().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def _step(rank: int, world_size: int, mode: str):
    """Gradients of one step on this rank's half of the batch under `mode`."""
    model, batch = build_model_and_batch()
    if not mode.endswith("_unpatched"):
        fastbert.patch(model)
    mode = mode.removesuffix("_unpatched")
    half = batch["labels"].shape[0] // world_size
    local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # keep it alive through backward
        ddp(**local).loss.backward()
        return _grads(model)
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp_per_layer":  # what Trainer/Accelerate auto-wrap does (_no_split_modules = BertLayer)
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
    fully_shard(model)
    model(**local).loss.backward()
    # FSDP reduce-scatters the mean over ranks, as DDP all-reduces it.
    return _grads(model, full=True)


def run(rank: int, world_size: int, port: int, modes: list, out_path: str) -> None:
    """For each mode: its gradients, or the error it raised (as text)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    try:
        for mode in modes:
            try:
                results[mode] = _step(rank, world_size, mode)
            except Exception as exc:  # reported to the test, which decides
                results[mode] = f"{type(exc).__name__}: {exc}"
            dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()
