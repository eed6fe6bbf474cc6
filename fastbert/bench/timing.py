"""Interleaved wall-clock timing of several implementations on the same inputs.

Every repeat runs each implementation once, in an order rotated by one each repeat, so that drift
(thermal, other processes, clock changes) hits all of them alike. On CUDA the device is synchronized
before and after each timed call. Warm-up calls (compilation, autotuning, allocator growth) are
never timed.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of fn takes, with the device idle before and drained after."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def rotated(names: list[str], shift: int) -> list[str]:
    shift %= len(names)
    return names[shift:] + names[:shift]


def interleaved_times(
    calls: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """{name: [seconds per repeat]} for each call, warm-up excluded, round-robin interleaved."""
    names = list(calls)
    for round_ in range(warmup):
        for name in rotated(names, round_):
            calls[name]()
    _synchronize(device)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in rotated(names, repeat):
            times[name].append(time_call(calls[name], device))
    return times


def peak_memory(fn: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device during one call of fn (weights included); None on CPU."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def summarize(seconds: list[float]) -> dict:
    """Median (p50), p99, quartiles and extremes of a list of durations, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms),
        "p99_ms": _percentile(ms, 0.99),
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "times_ms": [s * 1e3 for s in seconds],
    }


def _percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending list: the smallest value >= `fraction` of the values."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def paired_speedup(reference: list[float], candidate: list[float]) -> float:
    """Median over repeats of reference / candidate time, pairing the calls of the same repeat."""
    return statistics.median(r / c for r, c in zip(reference, candidate))
