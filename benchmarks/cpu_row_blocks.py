"""Whether oneDNN's packed bf16 GEMM runs faster on 256-row blocks than whole, per shape, on this CPU.

The measurement behind the machine record's `bf16_row_blocks` row (fastbert/cpu/machine.py) and the row range in
fastbert/cpu/onednn_row_blocks.py. Prints, per (rows, K, N), the median time of the whole GEMM and of the
blocked one (after a warm-up of each), and their ratio; blocks pay where the ratio is well under 1. Re-run it
on a new kind of CPU before trusting the table there.

    python benchmarks/cpu_row_blocks.py [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastbert.cpu import onednn_linear, onednn_row_blocks
from fastbert.cpu.info import cpu_name
from fastbert.cpu.machine import choice

SHAPES = [(rows, k, n) for rows in (512, 1024, 2048) for k, n in ((384, 384), (384, 1536), (1536, 384),
                                                                  (768, 768), (768, 3072), (3072, 768))]


def _median_ms(run, x, packed, bias, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(x, packed, bias)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    problem = onednn_linear.mkldnn_problem() or onednn_linear.bf16_problem()
    if problem is not None:
        raise SystemExit(f"oneDNN's bf16 GEMM does not run here: {problem}")
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {args.threads} threads; machine record: bf16_row_blocks = {choice('bf16_row_blocks')}")
    print("rows K N | whole ms | blocks ms | blocks/whole")
    with torch.inference_mode():
        for rows, k, n in SHAPES:
            x = torch.randn(rows, k).bfloat16()
            packed = onednn_linear.packed_weight(torch.randn(n, k).bfloat16())
            bias = torch.randn(n)
            for run in (onednn_row_blocks.whole, onednn_row_blocks.in_blocks):  # warm both
                run(x, packed, bias)
            whole = _median_ms(onednn_row_blocks.whole, x, packed, bias, args.rounds)
            blocks = _median_ms(onednn_row_blocks.in_blocks, x, packed, bias, args.rounds)
            print(f"{rows} {k} {n} | {whole:.3f} | {blocks:.3f} | {blocks / whole:.2f}")


if __name__ == "__main__":
    main()
