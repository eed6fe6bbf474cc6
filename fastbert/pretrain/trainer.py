"""HF Trainer for pretraining, with what the pretraining log needs on top.

Trainer does the loop, gradient accumulation, warmup + linear decay, clipping, bf16 autocast, DDP,
checkpoints and resume. Added here: the MLM and NSP parts of the loss and tokens/s in every log
entry, train_log.jsonl (one JSON object per logged step; the last step is always logged), the
progress bar's loss and tokens/s, and loss.png at the end.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

LOSS_PARTS = ("mlm_loss", "nsp_loss")
LOG_NAME, PLOT_NAME = "train_log.jsonl", "loss.png"


class PretrainingTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_count = 0
        self._rate_start = None  # (time, tokens seen) at the previous log

    def train(self, *args, **kwargs):
        self._rate_start = None
        self._train_called = time.perf_counter()
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in LOSS_PARTS:
                part = outputs.get(name) if hasattr(outputs, "get") else None
                if part is not None:
                    self._part_sums[name] = self._part_sums.get(name, 0) + part.detach().float()
            self._part_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._loss_parts())
            logs["tokens_per_second"] = self._token_rate()
        super().log(logs, *args, **kwargs)

    def _loss_parts(self) -> dict:
        """Mean MLM / NSP loss over the micro-batches since the last log, averaged over processes."""
        parts = {}
        for name, total in self._part_sums.items():
            mean = self.accelerator.reduce(total / max(self._part_count, 1), reduction="mean")
            parts[name] = round(mean.item(), 4)
        self._part_sums, self._part_count = {}, 0
        return parts

    def _token_rate(self) -> float:
        """Real (non-padding) tokens per second, all processes together, since the last log."""
        now, seen = time.perf_counter(), self.state.num_input_tokens_seen
        # Trainer sets _initial_num_input_tokens_seen when train() starts (after loading a checkpoint)
        start_time, start_seen = self._rate_start or (self._train_called, self._initial_num_input_tokens_seen)
        self._rate_start = (now, seen)
        return round((seen - start_seen) / max(now - start_time, 1e-9), 1)


class JsonlLogCallback(TrainerCallback):
    """Appends each logged training step to DIR/train_log.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            with self.path.open("a") as log:
                log.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class LogFinalStepCallback(TrainerCallback):
    """Logs the last step whatever --logging-steps is, so that a run shorter than the interval has a log."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


class LossProgressCallback(ProgressCallback):
    """Trainer's progress bar, with the latest loss and tokens/s on it instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs['tokens_per_second']:.0f}")


def keep_log_until(path: Path, step: int) -> None:
    """On resume: drop the entries an interrupted run logged after the checkpoint it resumes from."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = read_log(log_path)
    figure, axes = plt.subplots(figsize=(7, 4))
    for name in ("loss", *LOSS_PARTS):
        points = [(entry["step"], entry[name]) for entry in entries if name in entry]
        if points:
            axes.plot(*zip(*points), label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("fastbert pretrain")
    if entries:
        axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
