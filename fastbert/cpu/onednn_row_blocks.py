"""The packed oneDNN GEMM on row blocks, where oneDNN would leave a thread idle (bf16 with AMX).

Why: on the AMX Xeon of 2026-12-01 (torch 2.13's oneDNN), the bf16 GEMM runs some shapes on one thread
even when torch has two: 2 threads take 0.93-0.99x the 1-thread time for N=768 outputs at 512-1024 rows
and for N=384 at 256-768 rows, and 1.9-2.1x at 2048 rows (docs/engineering/perf-notes.md). bert-base's
attention output and FFN output projections at 8 x 128 tokens are such shapes. The same GEMM on blocks of
256 rows, one after the other, runs each block on both threads: 1.7-1.8x faster there. fp32 is not affected.

Whether blocks run is a row of the machine record (`machine.CHOICES["bf16_row_blocks"]`: on a CPU with AMX),
for calls of MIN_ROWS..MAX_ROWS rows on more than one thread, decided by benchmarks/cpu_row_blocks.py; it is
never timed inside a serving process, where a measurement would read the contention of the moment and keep
it. Each row of the result is computed from that row alone either way, so the blocked result equals the
whole one (tests/cpu/test_onednn_row_blocks.py checks it bitwise): a wrong table costs speed, never accuracy.
"""
from __future__ import annotations

import torch

from fastbert.cpu import machine

BLOCK_ROWS = 256
MIN_ROWS = 2 * BLOCK_ROWS  # below this one block is the whole GEMM
MAX_ROWS = 1024  # from 2048 rows on oneDNN used both threads itself (measured on the AMX Xeon)


def whole(x, weight, bias, attribute="none", algorithm=""):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attribute, [], algorithm)


def in_blocks(x, weight, bias, attribute="none", algorithm=""):
    return torch.cat([whole(block, weight, bias, attribute, algorithm) for block in x.split(BLOCK_ROWS)])


def uses_blocks(rows: int, threads: int) -> bool:
    """Whether a 2-D bf16 call of `rows` rows on `threads` threads runs in row blocks here."""
    return MIN_ROWS <= rows <= MAX_ROWS and threads > 1 and machine.choice("bf16_row_blocks")


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attribute: str = "none",
                algorithm: str = "") -> torch.Tensor:
    """torch.ops.mkldnn._linear_pointwise(x, weight, bias, attribute, [], algorithm) for a bf16 x and a
    packed bf16 weight, on row blocks where the machine record says so."""
    if x.dim() == 2 and uses_blocks(x.shape[0], torch.get_num_threads()):
        return in_blocks(x, weight, bias, attribute, algorithm)
    return whole(x, weight, bias, attribute, algorithm)
