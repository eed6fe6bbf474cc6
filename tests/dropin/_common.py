"""Helpers for the drop-in tests: an HF model and an untouched copy of it, losses, gradients."""
from __future__ import annotations

import copy

import torch
import transformers

from tests.helpers import max_error


def hf_pair(name: str, config, seed: int = 0, train: bool = False):
    """(model, reference): a transformers model and an independent deep copy with the same weights."""
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config)
    model.train(train)
    return model, copy.deepcopy(model)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model: torch.nn.Module, batch: dict):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), grads_of(model)


def assert_grads_close(grads: dict, ref_grads: dict, atol: float = 1e-5) -> None:
    assert grads.keys() == ref_grads.keys()
    assert ref_grads, "no gradients at all"
    for key, ref in ref_grads.items():
        scale = max(1.0, ref.abs().max().item())
        err = max_error(grads[key], ref)
        assert err <= atol * scale, f"{key}: gradient error {err:.3g}"


def count_calls(monkeypatch, module, name: str) -> list:
    """Replaces module.<name> for this test by a wrapper that calls it and appends 1 to the list returned."""
    calls = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def real_tokens(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of a (batch, seq, ...) tensor at real tokens (fastbert leaves zeros at padding)."""
    return tensor[mask.bool()]
