"""Host-side facts the Triton kernels share with the rest of fastbert, without importing triton:
whether Triton runs in its CPU interpreter, and the dropout seed every fused backend draws."""
from __future__ import annotations

import os

import torch


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET set to anything but "" or "0")."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default CPU generator, so torch.manual_seed makes masks reproducible.

    A CPU int64 tensor: drawing it never syncs a GPU, and torch.compile keeps it inside the graph.
    Below 2**31 so that it fits the kernels' i32 seed arguments.
    """
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def seed_value(seed: torch.Tensor | None) -> int:
    """The int inside a seed from draw_seed (read inside an op, where the host value is needed); 0 if None."""
    return int(seed.item()) if seed is not None else 0
