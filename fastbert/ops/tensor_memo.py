"""TensorMemo: values derived from a tensor, kept while that tensor lives and has not changed.

Tensors cannot be dict keys by value (== is elementwise), so entries are keyed by id() and hold a weak
reference that must still point at the same tensor, plus its version counter (in-place writes bump it).
Inference tensors have no version counter: for them the state is the values themselves (meant for
small tensors such as cu_seqlens or an inv_freq buffer).
"""
from __future__ import annotations

import weakref

import torch


def _state(tensor: torch.Tensor):
    if tensor.is_inference():
        return tuple(tensor.flatten().tolist())
    return tensor._version


class TensorMemo:
    def __init__(self, size: int = 8):
        self._entries: dict[int, tuple] = {}
        self._size = size

    def get(self, tensor: torch.Tensor, key):
        """The value stored for (tensor, key), or None when there is none or the tensor changed since."""
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != (_state(tensor), key):
            return None
        return entry[2]

    def put(self, tensor: torch.Tensor, key, value):
        if len(self._entries) >= self._size:
            self._entries = {i: e for i, e in self._entries.items() if e[0]() is not None}
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
        self._entries[id(tensor)] = (weakref.ref(tensor), (_state(tensor), key), value)
        return value
