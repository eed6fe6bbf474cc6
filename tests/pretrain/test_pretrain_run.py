"""`fastbert pretrain` end to end on a tiny config: loss falls, outputs load, resume is exact, DDP runs."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from fastbert.pretrain.data import CorpusOptions, build_pretraining_dataset
from tests.pretrain.conftest import pretrain_args, read_log, run_pretrain

REPO = Path(__file__).resolve().parents[2]


def assert_loads_in_transformers(output, hf_class):
    model, info = hf_class.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (Path(output) / "tokenizer.json").exists()
    return model


def test_nsp_run_loss_falls_and_transformers_loads_the_output(tokenizer_dir, corpus, tiny_config_dir, cache_dir,
                                                               tmp_path):
    output = tmp_path / "out"
    run_pretrain(tokenizer_dir, corpus, tiny_config_dir, output, cache_dir, "--max-steps", "30", "--save-steps", "15")
    log = read_log(output)
    assert [entry["step"] for entry in log] == list(range(1, 31))
    for entry in log:
        assert {"loss", "mlm_loss", "nsp_loss", "learning_rate", "tokens_per_second"} <= set(entry)
        assert entry["tokens_per_second"] > 0
        assert entry["loss"] == pytest.approx(entry["mlm_loss"] + entry["nsp_loss"], abs=2e-3)
    first, last = [sum(e["mlm_loss"] for e in part) / 5 for part in (log[:5], log[-5:])]
    assert last < first - 0.5, (first, last)
    assert (output / "checkpoint-15").is_dir() and (output / "checkpoint-30").is_dir()
    assert (output / "loss.png").stat().st_size > 0
    model = assert_loads_in_transformers(output, transformers.BertForPreTraining)
    assert "sparse_mlm_head" not in model.config.to_dict()


def test_mlm_only_whole_word_run_from_a_preset(tokenizer_dir, corpus, cache_dir, tmp_path):
    output = tmp_path / "out"
    run_pretrain(tokenizer_dir, corpus, "bert-tiny", output, cache_dir, "--max-steps", "3", "--no-nsp",
                 "--whole-word-mask", "--gradient-accumulation-steps", "2")
    log = read_log(output)
    assert len(log) == 3 and "nsp_loss" not in log[0] and "mlm_loss" in log[0]
    assert_loads_in_transformers(output, transformers.BertForMaskedLM)


def record_training_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(masked input_ids, labels) of every micro-batch the model trains on, in order."""
    from fastbert.pretrain.trainer import PretrainingTrainer

    seen = []
    compute_loss = PretrainingTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(PretrainingTrainer, "compute_loss", recording)
    return seen


def test_resumed_run_has_the_same_masks_and_losses_step_for_step(tokenizer_dir, corpus, tiny_config_dir, cache_dir,
                                                                  tmp_path, monkeypatch):
    output = tmp_path / "out"
    args = (tokenizer_dir, corpus, tiny_config_dir, output, cache_dir, "--max-steps", "8", "--save-steps", "4",
            "--deterministic")
    batches = record_training_batches(monkeypatch)
    run_pretrain(*args)
    uninterrupted, uninterrupted_batches = read_log(output), list(batches)
    final_weights = transformers.BertForPreTraining.from_pretrained(output).state_dict()
    shutil.rmtree(output / "checkpoint-8")  # as if the run had stopped between steps 4 and 8
    batches.clear()
    run_pretrain(*args, "--resume")
    resumed = read_log(output)
    assert len(uninterrupted_batches) == 8 and len(batches) == 4
    for step, (before, after) in enumerate(zip(uninterrupted_batches[4:], batches), start=5):
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]), f"step {step}: other masks"
    assert [e["step"] for e in resumed] == list(range(1, 9))
    for before, after in zip(uninterrupted, resumed):
        for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm", "learning_rate"):
            assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-7), (before["step"], key)
    weights = transformers.BertForPreTraining.from_pretrained(output).state_dict()
    assert all(torch.allclose(weights[k], final_weights[k], rtol=0, atol=1e-6) for k in final_weights)


def test_run_shorter_than_the_logging_interval_logs_its_last_step(tokenizer_dir, corpus, tiny_config_dir, cache_dir,
                                                                   tmp_path):
    output = tmp_path / "out"
    run_pretrain(tokenizer_dir, corpus, tiny_config_dir, output, cache_dir, "--max-steps", "3",
                 "--logging-steps", "10")
    assert [entry["step"] for entry in read_log(output)] == [3]
    assert (output / "loss.png").stat().st_size > 0


def test_last_step_is_logged_between_intervals(tokenizer_dir, corpus, tiny_config_dir, cache_dir, tmp_path):
    output = tmp_path / "out"
    run_pretrain(tokenizer_dir, corpus, tiny_config_dir, output, cache_dir, "--max-steps", "5", "--logging-steps", "2")
    assert [entry["step"] for entry in read_log(output)] == [2, 4, 5]


def test_resume_without_a_checkpoint_is_an_error(tokenizer_dir, corpus, tiny_config_dir, cache_dir, tmp_path, capsys):
    from fastbert.cli import main

    args = pretrain_args(tokenizer_dir, corpus, tiny_config_dir, tmp_path, cache_dir, "--max-steps", "2", "--resume")
    assert main(args) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_config_too_small_for_the_tokenizer_is_an_error(tokenizer_dir, corpus, cache_dir, tmp_path, capsys):
    from fastbert.cli import main

    transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(tmp_path / "config")
    args = pretrain_args(tokenizer_dir, corpus, str(tmp_path / "config"), tmp_path / "out", cache_dir,
                         "--max-steps", "2")
    assert main(args) == 1
    assert "vocab_size 100" in capsys.readouterr().err


def test_two_process_torchrun(tokenizer_dir, corpus, tiny_config_dir, cache_dir, tmp_path, tokenizer):
    """Data parallel with gloo: each optimizer step takes 2 x batch-size examples, one batch per process.

    The run is shorter than the logging interval: its last step is logged all the same."""
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastbert", *pretrain_args(tokenizer_dir, corpus, tiny_config_dir, output, cache_dir,
                                                "--max-steps", "3", "--logging-steps", "10")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_log(output)
    assert [e["step"] for e in log] == [3]
    assert (output / "loss.png").stat().st_size > 0
    examples = len(build_pretraining_dataset(
        [corpus], tokenizer, CorpusOptions(max_seq_length=64, num_proc=1, seed=42, cache_dir=cache_dir)))
    steps_per_epoch = -(-examples // 16)  # batches of 8 on each of 2 processes
    assert log[0]["epoch"] == pytest.approx(3 / steps_per_epoch)
    assert_loads_in_transformers(output, transformers.BertForPreTraining)


def test_continue_pretraining_from_an_encoder_checkpoint(tokenizer_dir, corpus, tiny_config_dir, cache_dir, tmp_path,
                                                         capsys):
    """A checkpoint without pretraining heads: its encoder weights are the start, the heads start fresh (listed)."""
    start = tmp_path / "encoder"
    transformers.BertModel(transformers.BertConfig.from_pretrained(tiny_config_dir)).save_pretrained(start)
    output = tmp_path / "out"
    run_pretrain(tokenizer_dir, corpus, str(start), output, cache_dir, "--max-steps", "1", "--learning-rate", "0")
    assert "cls.seq_relationship.weight" in capsys.readouterr().out
    before = transformers.BertModel.from_pretrained(start).state_dict()
    after = transformers.BertForPreTraining.from_pretrained(output).bert.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
