"""The fused query/key/value weight: one (3 * hidden, hidden) weight and bias from a layer's three Linears.

PEFT targets the projections by name, so the modules stay separate and are fused here, at run time, for
both executors of a layer program (the live forward per call, the inference plan once): one cached copy.
"""
from __future__ import annotations

import operator
import weakref

import torch
from torch import nn

from fastbert import backend

# Per attention module. Kept outside the modules, so deepcopy, pickling and torch.save(model) never carry
# them; weak keys, so a dropped model takes its entry with it.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_VERSION = operator.attrgetter("_version")


def forget(module: nn.Module) -> None:
    """Drop the fused weights of every attention module inside `module`."""
    for sub in module.modules():
        _CACHE.pop(sub, None)


def cached(module: nn.Module) -> bool:
    """Whether any attention module inside `module` holds a fused copy."""
    return any(sub in _CACHE for sub in module.modules())


def fused_parameters(owner: nn.Module, query: nn.Linear, key: nn.Linear,
                     value: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the three Linears concatenated. Without autograd the copy is cached on `owner` until a
    parameter is replaced or changes (identity, version counter and storage address: .to(dtype/device) swaps a
    parameter's data in place without moving its version counter; the entry holds the parameters, so no address
    is ever reused). (map and operator over generator expressions: this runs per layer per call.)"""
    params = (query.weight, query.bias, key.weight, key.bias, value.weight, value.bias)
    caching = not backend.records_autograd() and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if caching:
        versions = (*map(_VERSION, params), *map(torch.Tensor.data_ptr, params))
        entry = _CACHE.get(owner)
        if entry is not None and entry[1] == versions and all(map(operator.is_, entry[0], params)):
            return entry[2], entry[3]
    weight, bias = torch.cat(params[0::2]), torch.cat(params[1::2])
    if caching:
        _CACHE[owner] = (params, versions, weight, bias)  # one assignment: thread-safe
    return weight, bias
