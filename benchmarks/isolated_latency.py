"""Batch-1 latency with each runtime alone in its own process (fastbert, HF, OpenVINO).

Why: in one process, OpenVINO's and torch's thread pools both spin while waiting, and on a small
machine they take each other's cores, so an interleaved in-process run (fastbert bench --baselines
openvino) can slow either side several-fold (docs/perf-notes.md). Here each round starts one fresh
process per runtime, in rotated order; a process warms up, then times --repeats forwards of the
same input. The report gives each runtime's median over rounds of its per-round median, and the
ratio of those medians; each runtime's output is checked against HF fp32 (cosine of mean pooling).

    python benchmarks/isolated_latency.py --model DIR --seq 16 --rounds 5 --repeats 300 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

RUNTIMES = ("hf-sdpa", "fastbert-fp32", "fastbert-bf16", "openvino-f32", "openvino-default")


def _inputs(tokenizer, seq: int):
    words = " ".join(["the quick brown fox jumps over the lazy dog"] * seq)
    return tokenizer([words], truncation=True, max_length=seq, return_tensors="pt")


def _torch_runner(name: str, model_dir: str):
    import torch
    import transformers

    import fastbert

    if name == "hf-sdpa":
        model = transformers.BertModel.from_pretrained(model_dir, attn_implementation="sdpa")
    else:
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        model = fastbert.BertModel.from_pretrained(model_dir, dtype=dtype)
    model.eval()

    def run(inputs):
        with torch.inference_mode():
            return model(**inputs).last_hidden_state.float()
    return run


def _openvino_runner(name: str, model_dir: str):
    import torch
    import transformers

    from fastbert.bench import openvino_baseline

    eager = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    names = ("input_ids", "attention_mask", "token_type_ids")
    implementation = openvino_baseline.build(eager, names)[name]

    class Feeds:  # the shape OpenVinoImplementation.output reads: workload.inputs[name]
        def __init__(self, inputs):
            self.inputs = inputs

    def run(inputs):
        return implementation.output(Feeds(inputs)).to(torch.float32)
    return run


def child(name: str, model_dir: str, seq: int, repeats: int, threads: int) -> dict:
    """One runtime in this process: warm up, time `repeats` forwards, return times and the pooled output."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    inputs = _inputs(tokenizer, seq)
    runner = (_openvino_runner if name.startswith("openvino") else _torch_runner)(name, model_dir)
    for _ in range(20):
        output = runner(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(inputs)
        times.append(time.perf_counter() - start)
    return {"times": times, "pooled": output.mean(dim=1)[0].tolist()}


def _run_child(name: str, args) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model", args.model, "--seq", str(args.seq),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def parent(args) -> dict:
    medians = {name: [] for name in args.runtimes}
    pooled = {}
    for round_index in range(args.rounds):
        shift = round_index % len(args.runtimes)
        for name in args.runtimes[shift:] + args.runtimes[:shift]:
            result = _run_child(name, args)
            medians[name].append(statistics.median(result["times"]))
            pooled[name] = result["pooled"]
            print(f"round {round_index} {name:18s} median {medians[name][-1] * 1e3:8.3f} ms", flush=True)
    reference = pooled.get("hf-sdpa")
    summary = {}
    for name, values in medians.items():
        summary[name] = {"median_ms": statistics.median(values) * 1e3, "round_medians_ms": [v * 1e3 for v in values]}
        if reference is not None:
            summary[name]["cosine_to_hf_fp32"] = _cosine(pooled[name], reference)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local HF BERT directory")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)}")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.seq, args.repeats, args.threads)))
        return
    args.runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"--runtimes: unknown {unknown}; choose from {RUNTIMES}")
    summary = parent(args)
    for name, record in summary.items():
        print(f"{name:18s} {record['median_ms']:8.3f} ms  cos {record.get('cosine_to_hf_fp32', float('nan')):.6f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": vars(args), "results": summary}, handle, indent=1)


if __name__ == "__main__":
    main()
