"""Which fp32 GEMM runs the encoder's inference GEMMs fastest on this CPU, by row count, and where GELU goes.

The measurement behind two rows of the machine record (fastbert/cpu/machine.py):
- `onednn_fp32_max_rows`: up to how many rows oneDNN's packed GEMM beats torch's F.linear (MKL); above it the
  plans run F.linear. Compared per (rows, K, N) with no epilogue.
- `gelu_epilogue`: whether the FFN-in GELU goes into oneDNN's epilogue (its post-op) or into fastbert's bias_gelu
  kernel after the GEMM. Compared at the FFN-in shapes (K -> 4K).

oneDNN is called directly (torch.ops.mkldnn._linear_pointwise on a weight packed once), so the comparison does not
depend on the rules it decides. Each call of each variant is timed once per round, the variants interleaved,
over --rounds rounds; the table gives the medians and their ratios, and the summary the geometric mean ratio per
row count. Re-run it on a new kind of CPU before trusting the rows there.

    python benchmarks/cpu_linear_order.py [--rounds 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from fastbert.cpu.info import cpu_features, cpu_name
from fastbert.ops.bias_gelu import bias_gelu

# (K, N): MiniLM's and bert-base's QKV, attention output, FFN in and FFN out
SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384), (768, 2304), (768, 768), (768, 3072), (3072, 768))
FFN_IN = ((384, 1536), (768, 3072))
ROWS = (16, 64, 128, 256, 384, 614, 2048)


def _median_ms(rounds: int, *variants) -> list[float]:
    """Per variant (a callable of no arguments): the median of `rounds` interleaved timings, in ms."""
    for variant in variants:
        variant(), variant()  # pack, warm
    times = [[] for _ in variants]
    for _ in range(rounds):
        for timings, variant in zip(times, variants):
            start = time.perf_counter()
            variant()
            timings.append(time.perf_counter() - start)
    return [1e3 * statistics.median(timings) for timings in times]


def _packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _onednn(x, packed, bias, attribute="none", algorithm=""):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attribute, [], algorithm)


def _gelu_after(x, packed, bias):
    return bias_gelu(_onednn(x, packed, bias), None)


def _table(rounds: int, header: str, shapes, variants) -> dict[int, list[float]]:
    """{rows: [first variant's time / second's, per shape]}, printed as it goes; `variants(x, weight, bias, packed)`
    gives the two callables."""
    print(f"rows K N | {header}")
    ratios = {}
    for rows in ROWS:
        for k, n in shapes:
            x, weight, bias = torch.randn(rows, k), torch.randn(n, k) / k**0.5, torch.randn(n)
            first, second = _median_ms(rounds, *variants(x, weight, bias, _packed(weight)))
            ratios.setdefault(rows, []).append(first / second)
            print(f"{rows} {k} {n} | {first:.3f} | {second:.3f} | {first / second:.2f}", flush=True)
    return ratios


def gemm_rows(rounds: int) -> dict[int, list[float]]:
    """{rows: [oneDNN / F.linear per shape]}."""
    return _table(rounds, "oneDNN packed ms | F.linear ms | oneDNN / F.linear", SHAPES,
                  lambda x, weight, bias, packed: (partial(_onednn, x, packed, bias),
                                                   partial(F.linear, x, weight, bias)))


def gelu_placement(rounds: int) -> dict[int, list[float]]:
    """{rows: [oneDNN with its GELU epilogue / oneDNN then fastbert's bias_gelu, per FFN-in shape]}."""
    return _table(rounds, "oneDNN + GELU epilogue ms | oneDNN, then bias_gelu ms | epilogue / after", FFN_IN,
                  lambda x, weight, bias, packed: (partial(_onednn, x, packed, bias, "gelu", "none"),
                                                   partial(_gelu_after, x, packed, bias)))


def _summary(title: str, ratios: dict[int, list[float]]) -> None:
    print(title + ": " + ", ".join(f"{rows} rows {statistics.geometric_mean(values):.2f}"
                                   for rows, values in ratios.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()} ({' '.join(cpu_features())}), {args.threads} threads, fp32")
    with torch.inference_mode():
        gemm = gemm_rows(args.rounds)
        gelu = gelu_placement(args.rounds)
    _summary("geometric mean oneDNN / F.linear (< 1: oneDNN faster)", gemm)
    _summary("geometric mean GELU epilogue / bias_gelu after the GEMM (< 1: the epilogue faster)", gelu)


if __name__ == "__main__":
    main()
