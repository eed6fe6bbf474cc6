"""Per-call Python overhead of a fastbert forward on CPU: a 12-layer model of width 64 on 1 x 8 tokens,
where the arithmetic costs microseconds, so the time is dispatch, Python and op-launch overhead.
fastbert (patched; with its inference plan, and with plans off: the general forward) and HuggingFace
(SDPA) interleaved; medians of many calls. With --count-calls it
also counts the Python-level calls (functions and builtins, via sys.setprofile) of one forward of
each: the number to compare before and after a change to the forward (docs/engineering/perf-notes.md).

    python benchmarks/cpu_call_overhead.py [--threads 2] [--repeats 300] [--count-calls]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers

import fastbert
from fastbert.models import plan


def _model(config, patched: bool):
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    return fastbert.patch(model) if patched else model


def _general(model):
    """The model's forward with inference plans off (each op resolved per call, as before plans)."""
    def forward(**inputs):
        plan.set_plans(False)
        try:
            return model(**inputs)
        finally:
            plan.set_plans(True)
    return forward


def count_calls(model, inputs: dict) -> int:
    """Python-level calls (functions and builtins) made by one forward."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        model(**inputs)
    finally:
        sys.setprofile(None)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--count-calls", action="store_true", help="also count Python calls per forward")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = transformers.BertConfig(hidden_size=64, num_attention_heads=1, intermediate_size=256)
    config._attn_implementation = "sdpa"
    models = {"hf-sdpa": _model(config, False), "fastbert": _model(config, True),
              "fastbert-general": _general(_model(config, True))}
    ids = torch.randint(1, config.vocab_size, (args.batch, args.seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(20):
                model(**inputs)
        for repeat in range(args.repeats):
            shift = repeat % len(models)
            for name in list(models)[shift:] + list(models)[:shift]:
                start = time.perf_counter()
                models[name](**inputs)
                times[name].append(time.perf_counter() - start)
        calls = {name: count_calls(model, inputs) for name, model in models.items()} if args.count_calls else {}
    for name, values in times.items():
        counted = f", {calls[name]} Python calls" if calls else ""
        print(f"{name}: median {statistics.median(values) * 1e3:.3f} ms per forward{counted} "
              f"({config.num_hidden_layers} layers, {args.batch}x{args.seq} tokens, width {config.hidden_size})")


if __name__ == "__main__":
    main()
