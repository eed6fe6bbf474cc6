"""fastbert.patch / fastbert.unpatch: the fast encoder path in an existing HuggingFace model, in place.

One generic driver for every family in fastbert.models.families: walk model.modules() and give every
module whose type is exactly a supported transformers base model (BertModel, RobertaModel,
XLMRobertaModel, CamembertModel, ElectraModel, DistilBertModel, AlbertModel) fastbert's subclass of
it, which adds no state and only replaces forward. So this works on a bare base model, any head,
and anything that holds one (a sentence-transformers SentenceTransformer, a PEFT PeftModel, a user's
own nn.Module).

Nothing else changes: the module objects, parameters (same tensors, same ids, requires_grad, device,
dtype), buffers, state_dict keys, hooks and the optimizer state that refers to them all stay as they
were. Swapped modules are marked, so unpatch() swaps back exactly those, and a native fastbert model
(which is not a patched one) is left alone by both.
"""
from __future__ import annotations

from torch import nn

from fastbert.models import modernbert  # noqa: F401 (registers ModernBERT's layer kind)
from fastbert.models.encoder import clear_fused_qkv_cache
from fastbert.models.families import supported_names
from fastbert.models.native import native_of, plain_of, reads_first_column, use_fast_forward, use_plain_forward

_MARK = "_fastbert_patched"


class UnsupportedModelError(ValueError):
    """patch() was given a model that holds no model of a family fastbert supports."""


def _base_models(model: nn.Module) -> list[nn.Module]:
    """The supported base models inside `model`: exactly a transformers base model class of some layer kind
    (native.KINDS), or already fastbert's (native, or patched before)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if native_of(type(m)) is not None or plain_of(type(m)) is not None]


def _bases_read_by_first_column(model: nn.Module) -> set[int]:
    """ids of base models inside heads that read [:, 0] of the padded output themselves."""
    return {id(getattr(m, m.base_model_prefix)) for m in model.modules() if reads_first_column(m)}


def patch(model: nn.Module) -> nn.Module:
    """Run every supported transformers base model inside `model` on fastbert's fast path; returns `model`.

    In place and reversible (unpatch). Raises UnsupportedModelError, listing the supported families,
    if `model` holds none. Subclasses of the transformers base classes other than fastbert's are
    left alone (their forward may differ); so are modules inside them of classes fastbert does not
    know, which make the model run transformers' forward with one warning.
    """
    found = _base_models(model)
    if not found:
        raise UnsupportedModelError(
            f"fastbert.patch: {type(model).__name__} contains no model of a family fastbert supports. "
            f"Supported: {supported_names()}"
        )
    first_column = _bases_read_by_first_column(model)
    for module in found:
        if native_of(type(module)) is not None:  # transformers' class: swap (fastbert's are left as they are)
            use_fast_forward(module, first_token_at_column_0=id(module) in first_column)
            module.__dict__[_MARK] = True
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): the modules it swapped get transformers' classes back; returns `model`."""
    for module in model.modules():
        if module.__dict__.pop(_MARK, False):
            use_plain_forward(module)
            clear_fused_qkv_cache(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """True if patch() swapped at least one base model inside `model` (and unpatch has not undone it)."""
    return any(m.__dict__.get(_MARK, False) for m in model.modules())
