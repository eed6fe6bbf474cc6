"""A process-wide cache of weights repacked for a CPU GEMM (oneDNN's blocked layout, AMX tiles).

Keyed on the weight tensor's identity (weakly: an entry dies with its weight) and checked against the
weight's version counter and storage address, so a replaced or changed parameter is repacked on its next
use. Never module state: packed copies do not appear in state_dict, deepcopy or pickles.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable, NamedTuple

import torch

from fastbert.env import flag

# The one switch of every packed CPU GEMM (oneDNN's and the few-rows kernels'): FASTBERT_PACKED_WEIGHTS, or
# onednn_linear.set_packing, which also empties the caches and the registry's memo.
_packing = flag("FASTBERT_PACKED_WEIGHTS", default=True)


def packing_enabled() -> bool:
    return _packing


def set_packing_flag(enabled: bool) -> None:
    global _packing
    _packing = bool(enabled)


class _Packed(NamedTuple):
    source: weakref.ref  # the weight it was packed from (the key holds its id; this proves it is the same tensor)
    stamp: tuple  # (version counter, storage address) of the weight when packed
    packed: torch.Tensor
    nbytes: int


def _version(weight: torch.Tensor) -> int | None:
    """The version counter; None for inference tensors, which have none (an inference tensor changed in
    place inside inference_mode is not noticed: fastbert's own fused QKV weight is rebuilt, never changed)."""
    return None if weight.is_inference() else weight._version


class PackedWeights:
    """(id(weight), variant) -> the packed copy. A plain dict, not a WeakIdKeyDictionary, whose lookups
    cost a Python-level weak reference per call; each entry is removed when its weight dies."""

    def __init__(self):
        self._entries: dict[tuple, _Packed] = {}
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, variant: Hashable,
            pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """pack(weight) from the cache while the weight is the same tensor, unchanged; `variant` tells apart
        packings of one weight (e.g. the dtype it is packed in)."""
        key, stamp = (id(weight), variant), (_version(weight), weight.data_ptr())
        entry = self._entries.get(key)
        if entry is not None and entry.source() is weight and entry.stamp == stamp:
            return entry.packed
        with torch.no_grad():
            packed = pack(weight.detach())
        nbytes = weight.numel() * packed.element_size()  # the packed copy's size (blocked layouts may pad)
        entry = _Packed(weakref.ref(weight, self._forget(key)), stamp, packed, nbytes)
        with self._lock:
            self._entries[key] = entry
        return packed

    def _forget(self, key: tuple):
        def callback(_reference) -> None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.source() is None:
                    del self._entries[key]
        return callback

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def nbytes(self) -> int:
        """Memory the packed copies hold now (numel x the packed element size, per weight)."""
        return sum(entry.nbytes for entry in list(self._entries.values()))
