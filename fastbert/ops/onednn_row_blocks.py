"""The packed oneDNN GEMM on row blocks, where oneDNN would leave a thread idle (bf16, measured per shape).

Why: on the AMX Xeon of 2026-12-01 (torch 2.13's oneDNN), the bf16 GEMM runs some shapes on one thread
even when torch has two: 2 threads take 0.93-0.99x the 1-thread time for N=768 outputs at 512-1024 rows
and for N=384 at 256-768 rows, and 1.9-2.1x at 2048 rows (docs/perf-notes.md). bert-base's attention
output and FFN output projections at 8 x 128 tokens are such shapes. The same GEMM on blocks of 256 rows,
one after the other, runs each block on both threads: 1.7-1.8x faster there. fp32 is not affected.

Which shapes gain is a property of this oneDNN on this CPU, so it is measured, not assumed: the first
call of a (rows bucket, K, N, threads) shape with 512 rows or more times the whole GEMM and the blocked
one (best of two each) on its own input, and blocks are used from then on if they took under 0.85x the
whole GEMM's time. Each row of the result is computed from that row alone either way; the blocked result
equals the whole one (tests/ops/test_onednn_row_blocks.py checks it bitwise on this machine).
"""
from __future__ import annotations

import time

import torch

BLOCK_ROWS = 256
MIN_ROWS = 2 * BLOCK_ROWS  # below this the GEMM is small and a measurement would cost more than it saves
GAIN_NEEDED = 0.85  # blocks must take under this fraction of the whole GEMM's time

# (rows bucket, K, N, threads) -> whether row blocks run faster; filled by measurement, one entry per shape
_faster_in_blocks: dict[tuple[int, int, int, int], bool] = {}


def _whole(x, weight, bias, attribute, algorithm):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attribute, [], algorithm)


def _in_blocks(x, weight, bias, attribute, algorithm):
    return torch.cat([_whole(block, weight, bias, attribute, algorithm) for block in x.split(BLOCK_ROWS)])


def _best_time(run, *arguments) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), None
    for _ in range(2):
        start = time.perf_counter()
        result = run(*arguments)
        best = min(best, time.perf_counter() - start)
    return best, result


def _measure(key, arguments) -> torch.Tensor:
    whole_time, result = _best_time(_whole, *arguments)
    blocks_time, _ = _best_time(_in_blocks, *arguments)
    _faster_in_blocks[key] = blocks_time < GAIN_NEEDED * whole_time  # one assignment: thread-safe
    return result


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attribute: str = "none",
                algorithm: str = "") -> torch.Tensor:
    """torch.ops.mkldnn._linear_pointwise(x, weight, bias, attribute, [], algorithm) for a 2-D bf16 x and a
    packed bf16 weight, on row blocks where that measured faster for this shape."""
    rows = x.shape[0]
    if rows < MIN_ROWS or x.dim() != 2:
        return _whole(x, weight, bias, attribute, algorithm)
    threads = torch.get_num_threads()
    if threads < 2:
        return _whole(x, weight, bias, attribute, algorithm)
    key = (1 << (rows - 1).bit_length(), x.shape[1], weight.shape[0], threads)
    faster = _faster_in_blocks.get(key)
    arguments = (x, weight, bias, attribute, algorithm)
    if faster is None:
        return _measure(key, arguments)
    return _in_blocks(*arguments) if faster else _whole(*arguments)


def measured_shapes() -> dict[tuple[int, int, int, int], bool]:
    """What has been measured so far: {(rows bucket, K, N, threads): runs in row blocks}."""
    return dict(_faster_in_blocks)


def forget_measurements() -> None:
    _faster_in_blocks.clear()
