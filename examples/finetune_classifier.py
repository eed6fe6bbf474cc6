"""Fine-tune a `fastbert pretrain` output as a sentence classifier with HF Trainer.

    fastbert pretrain --tokenizer TOKENIZER_DIR --train corpus.txt --config bert-mini --output pretrained \\
        --max-steps 1000
    python examples/finetune_classifier.py --model pretrained --output classifier

The data is a small local labelled set (examples/data/sentiment.jsonl: {"text": ..., "label": 0 or 1}),
split 75/25 into train and test. The classifier head, and the pooler when the pretraining run was
MLM-only (BertForMaskedLM has none), start fresh: that is what init_new_head=True allows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from datasets import load_dataset
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

import fastbert

DATA = Path(__file__).resolve().parent / "data" / "sentiment.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a fastbert pretrain output directory (model + tokenizer)")
    parser.add_argument("--output", required=True, help="where the fine-tuned classifier is written")
    parser.add_argument("--data", default=str(DATA), help="JSON lines with text and label")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (overrides --epochs)")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset("json", data_files=args.data, split="train").train_test_split(test_size=0.25, seed=args.seed)
    data = data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=128), batched=True)
    model = fastbert.BertForSequenceClassification.from_pretrained(args.model, num_labels=2, init_new_head=True)
    training_args = TrainingArguments(
        output_dir=args.output, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size, seed=args.seed,
        eval_strategy="epoch", save_strategy="no", logging_steps=1, report_to="none",
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["test"],
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(args.output)
    print(f"test accuracy {metrics['eval_accuracy']:.3f}, loss {metrics['eval_loss']:.4f}; wrote {args.output}")
    return metrics


if __name__ == "__main__":
    main()
