"""Pretrain, then fine-tune: a pretraining output loads as a sequence classifier and trains."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbert
from tests.helpers import random_batch, small_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("pretraining_head", [fastbert.BertForMaskedLM, fastbert.BertForPreTraining],
                         ids=lambda c: c.__name__)
def test_classifier_from_a_pretraining_output_trains_one_step(pretraining_head, tmp_path):
    """BertForMaskedLM saves no pooler: with init_new_head=True the pooler starts fresh like the classifier."""
    config = small_config()
    pretraining_head(config).save_pretrained(tmp_path)
    model = fastbert.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=2, init_new_head=True)
    encoder_before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    saved = pretraining_head.from_pretrained(tmp_path).bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(encoder_before, saved), "the encoder weights must come from the checkpoint"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = random_batch(config, 4, 12)
    loss = model(**batch, labels=torch.tensor([0, 1, 1, 0])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, encoder_before)


def test_finetune_example_runs_on_a_pretrain_output(tokenizer_dir, tmp_path):
    """examples/finetune_classifier.py on a tiny MLM-only model saved with the tokenizer, as pretrain writes."""
    import transformers

    pretrained = tmp_path / "pretrained"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    fastbert.BertForMaskedLM(small_config(vocab_size=len(tokenizer), max_position_embeddings=128)).save_pretrained(
        pretrained)
    tokenizer.save_pretrained(pretrained)
    done = subprocess.run(
        [sys.executable, "examples/finetune_classifier.py", "--model", str(pretrained), "--output",
         str(tmp_path / "classifier"), "--max-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy" in done.stdout
    fastbert.BertForSequenceClassification.from_pretrained(tmp_path / "classifier")  # strict: all weights there
