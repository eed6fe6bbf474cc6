"""fastbert.patch / fastbert.unpatch: the fast encoder path in an existing HuggingFace model, in place.

One generic driver: walk model.modules() and give every module whose type is exactly
transformers.BertModel the class fastbert.models.bert.BertModel, a subclass that adds no state and
only replaces forward. So this works on a bare BertModel, any Bert*For* head, and anything that holds
one (a sentence-transformers SentenceTransformer, a PEFT PeftModel, a user's own nn.Module).

Nothing else changes: the module objects, parameters (same tensors, same ids, requires_grad, device,
dtype), buffers, state_dict keys, hooks and the optimizer state that refers to them all stay as they
were. Swapped modules are marked, so unpatch() swaps back exactly those, and a native
fastbert.BertModel (which is not a patched one) is left alone by both.
"""
from __future__ import annotations

from torch import nn
from transformers.models.bert import modeling_bert as hf

from fastbert.models.bert import BertModel as FastBertModel
from fastbert.models.bert import use_fast_forward, use_plain_forward

_MARK = "_fastbert_patched"


def _bert_models(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, hf.BertModel)]


def patch(model: nn.Module) -> nn.Module:
    """Run every transformers BertModel inside `model` on fastbert's fast path; returns `model`.

    In place and reversible (unpatch). Raises ValueError if `model` holds no BertModel at all.
    Subclasses of transformers.BertModel other than fastbert's are left alone (their forward may differ).
    """
    found = _bert_models(model)
    if not found:
        raise ValueError(f"fastbert.patch: {type(model).__name__} contains no transformers BertModel")
    for module in found:
        if type(module) is hf.BertModel:
            use_fast_forward(module)
            module.__dict__[_MARK] = True
    return model


def _drop_fused_qkv_caches(module: nn.Module) -> None:
    for sub in module.modules():
        sub.__dict__.pop("_fastbert_qkv_cache", None)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): the modules it swapped get transformers.BertModel back; returns `model`."""
    for module in _bert_models(model):
        if type(module) is FastBertModel and module.__dict__.pop(_MARK, False):
            use_plain_forward(module)
            _drop_fused_qkv_caches(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """True if patch() swapped at least one BertModel inside `model` (and unpatch has not undone it)."""
    return any(type(m) is FastBertModel and m.__dict__.get(_MARK, False) for m in model.modules())
