"""`fastbert pretrain`: arguments and the run. Data parallel: `torchrun --nproc_per_node N -m fastbert pretrain ...`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXAMPLES = """examples:
  fastbert pretrain --tokenizer TOKENIZER_DIR --train corpus.txt --config bert-small --output out --max-steps 1000
  fastbert pretrain ... --output out --resume          # continue from the newest out/checkpoint-*
  torchrun --nproc_per_node 2 -m fastbert pretrain ...  # data parallel (gloo on CPU, NCCL on GPU)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES  # fastbert.cli's formatter keeps its lines
    data = parser.add_argument_group("data")
    data.add_argument("--tokenizer", required=True, metavar="DIR", help="a local HuggingFace tokenizer directory")
    data.add_argument("--train", required=True, nargs="+", metavar="FILE",
                      help="plain text: one sentence or line per line, a blank line between documents")
    data.add_argument("--max-seq-length", type=int, default=128, help="tokens per example, specials included")
    data.add_argument("--whole-word-mask", action="store_true", help="mask whole words (transformers: all [MASK])")
    data.add_argument("--mlm-probability", type=float, default=0.15, help="fraction of tokens (words) selected")
    data.add_argument("--preprocessing-workers", type=int, help="processes for tokenizing (default: up to 4)")
    data.add_argument("--cache-dir", help="datasets cache (default: HF_DATASETS_CACHE)")
    model = parser.add_argument_group("model")
    model.add_argument("--config", required=True, metavar="DIR|PRESET",
                       help="a preset (bert-base, bert-small, bert-mini, bert-tiny), a directory with config.json, "
                            "or a checkpoint directory (continues pretraining from its weights)")
    model.add_argument("--nsp", action=argparse.BooleanOptionalAction, default=True,
                       help="MLM + next-sentence prediction (BertForPreTraining), or MLM only (BertForMaskedLM)")
    train = parser.add_argument_group("training")
    train.add_argument("--output", required=True, metavar="DIR", help="model, tokenizer, checkpoints, logs")
    train.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=32, help="examples per device per micro-batch")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1,
                       help="micro-batches per optimizer step")
    train.add_argument("--learning-rate", type=float, default=1e-4, help="peak AdamW learning rate (linear decay)")
    train.add_argument("--warmup-steps", type=float, default=0.01, help="steps, or a fraction of --max-steps if < 1")
    train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    train.add_argument("--seed", type=int, default=42, help="seed of the weights, data order and masks")
    train.add_argument("--save-steps", type=int, default=500, help="write DIR/checkpoint-<step> every N steps")
    train.add_argument("--save-total-limit", type=int, help="keep only the newest N checkpoints")
    train.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    train.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")


class PretrainError(ValueError):
    """A problem with the arguments or the inputs, reported as one line."""


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (PretrainError, OSError) as exc:
        print(f"fastbert pretrain: error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    import transformers
    from transformers.trainer_utils import get_last_checkpoint

    from fastbert.pretrain.collator import PretrainingCollator
    from fastbert.pretrain.data import CorpusOptions, build_pretraining_dataset
    from fastbert.pretrain.model import build_model, check_sequence_length
    from fastbert.pretrain.trainer import LOG_NAME, PLOT_NAME, JsonlLogCallback, keep_log_until, plot_losses

    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
    output = Path(args.output)
    checkpoint = get_last_checkpoint(str(output)) if args.resume and output.is_dir() else None
    if args.resume and checkpoint is None:
        raise PretrainError(f"--resume: no checkpoint-<step> directory in {output}")
    training_args = _training_arguments(args)
    if training_args.world_size > 1 and training_args.parallel_mode.value != "distributed":
        raise PretrainError(f"{training_args.world_size} processes but no distributed data parallel; "
                            f"launch with torchrun (parallel mode: {training_args.parallel_mode.value})")
    transformers.set_seed(args.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        model = build_model(args.config, tokenizer, args.nsp)
        check_sequence_length(model.config, args.max_seq_length)
    except ValueError as exc:  # the config does not fit (named in the message)
        raise PretrainError(str(exc)) from exc
    options = CorpusOptions(max_seq_length=args.max_seq_length, nsp=args.nsp, with_offsets=args.whole_word_mask,
                            seed=args.seed, num_proc=args.preprocessing_workers, cache_dir=args.cache_dir)
    with training_args.main_process_first(desc="preparing the corpus"):  # the others then read its cache
        dataset = build_pretraining_dataset(args.train, tokenizer, options)
    collator = PretrainingCollator(tokenizer, mlm_probability=args.mlm_probability,
                                   whole_word_mask=args.whole_word_mask, seed=args.seed)
    trainer = _trainer(model, training_args, dataset, collator, tokenizer)
    log_path = output / LOG_NAME
    if training_args.process_index == 0:
        output.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            log_path.unlink(missing_ok=True)
        else:
            keep_log_until(log_path, int(Path(checkpoint).name.split("-")[-1]))
        log_path.touch()  # a resumed run that has no step left to train still has a log (and a plot)
    trainer.add_callback(JsonlLogCallback(log_path))
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(output))  # main process only, with the tokenizer (processing_class)
    if trainer.is_world_process_zero():
        plot_losses(log_path, output / PLOT_NAME)
        print(f"fastbert pretrain: wrote {output} (model, tokenizer, {LOG_NAME}, {PLOT_NAME})")
    return 0


def _training_arguments(args):
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        adam_epsilon=1e-6,  # BERT's
        max_grad_norm=args.max_grad_norm,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        seed=args.seed,
        full_determinism=args.deterministic,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,  # the collator needs special_tokens_mask, offset_mapping, example_id
        label_names=["labels", "next_sentence_label"] if args.nsp else ["labels"],
        use_cpu=not on_gpu,  # without it, accelerate runs torchrun's CPU processes unsynchronized (no DDP)
        ddp_backend=("nccl" if on_gpu else "gloo") if distributed else None,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=on_gpu,
        report_to="none",
        disable_tqdm=args.quiet,
    )


def _trainer(model, training_args, dataset, collator, tokenizer):
    from transformers.trainer_callback import ProgressCallback

    from fastbert.pretrain.trainer import LogFinalStepCallback, LossProgressCallback, PretrainingTrainer

    trainer = PretrainingTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                                 processing_class=tokenizer, callbacks=[LogFinalStepCallback()])
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossProgressCallback)
    return trainer
