"""Whether the packed oneDNN GEMM (fastbert.cpu.onednn_linear) or torch's F.linear runs fp32 inference GEMMs
faster on this CPU, at the encoder's shapes.

The measurement behind the machine record's `linear_order` row (fastbert/cpu/machine.py). Per (rows, K, N):
the median time of each, interleaved over rounds (one call of each per round), and their ratio; the few-rows
kernels are switched off here (FASTBERT_FEW_ROWS_GEMM=0 is set before import), so oneDNN's own GEMM is what is
compared. Re-run it on a new kind of CPU before trusting the order there.

    python benchmarks/cpu_linear_order.py [--rounds 31] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["FASTBERT_FEW_ROWS_GEMM"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastbert.cpu.info import cpu_features, cpu_name  # noqa: E402
from fastbert.cpu.onednn_linear import linear_onednn  # noqa: E402

# (K, N): MiniLM's and bert-base's QKV, attention output, FFN in and FFN out
SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384), (768, 2304), (768, 768), (768, 3072), (3072, 768))
ROWS = (16, 128, 614, 2048)


def _time(run, *arguments) -> float:
    start = time.perf_counter()
    run(*arguments)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()} ({' '.join(cpu_features())}), {args.threads} threads, fp32")
    print("rows K N | F.linear ms | oneDNN packed ms | oneDNN / F.linear")
    ratios = []
    with torch.inference_mode():
        for rows in ROWS:
            for k, n in SHAPES:
                x, weight, bias = torch.randn(rows, k), torch.randn(n, k) / k**0.5, torch.randn(n)
                linear_onednn(x, weight, bias), F.linear(x, weight, bias)  # pack, warm
                plain, packed = [], []
                for _ in range(args.rounds):
                    plain.append(_time(F.linear, x, weight, bias))
                    packed.append(_time(linear_onednn, x, weight, bias))
                a, b = 1e3 * statistics.median(plain), 1e3 * statistics.median(packed)
                ratios.append(b / a)
                print(f"{rows} {k} {n} | {a:.3f} | {b:.3f} | {b / a:.2f}")
    print(f"geometric mean oneDNN / F.linear: {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
