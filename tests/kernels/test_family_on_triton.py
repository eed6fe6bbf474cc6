"""A RoBERTa-family model (fairseq positions, eps 1e-5, one token type) running entirely on the Triton
kernels (interpreter on CPU, or a GPU): forward parity with transformers under left padding with a
pad-id hole, and a training step's loss and gradients. Run in its own invocation with TRITON_INTERPRET=1."""
import pytest
import torch
import transformers

import fastbert
from tests.helpers import assert_forward_matches, assert_training_step_matches, padding_mask

# Tiny model: the interpreter runs every kernel program in Python. head_dim 16 keeps tl.dot tiles >= 16.
CONFIG = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1,
              max_position_embeddings=20, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)


def twins(name, device):
    config = transformers.XLMRobertaConfig(**CONFIG)
    torch.manual_seed(0)
    reference = getattr(transformers, name)(config).to(device).eval()
    fast = getattr(fastbert, name)(config).to(device).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def batch(device, lengths, side):
    mask = padding_mask(lengths, 8, side)
    ids = torch.randint(3, 64, (len(lengths), 8), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 1)
    ids[0, 3] = 1  # a pad id inside a sequence: position padding_idx, no advance
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@pytest.mark.parametrize("side", ["right", "left"])
def test_family_forward_matches_transformers_on_triton(device, side):
    reference, fast = twins("XLMRobertaModel", device)
    assert_forward_matches(reference, fast, batch(device, [8, 3], side), "triton", atol=1e-4)


def test_family_training_step_matches_transformers_on_triton(device):
    reference, fast = twins("XLMRobertaForSequenceClassification", device)
    inputs = dict(batch(device, [8, 4], "right"), labels=torch.tensor([0, 1], device=device))
    assert_training_step_matches(reference, fast, inputs, "triton", atol=1e-4)
