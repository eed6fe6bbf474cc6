"""The native model running entirely on the Triton kernels (interpreter on CPU, or a GPU):
forward parity with transformers and a training step's loss and gradients."""
import pytest
import torch
import transformers

import fastbert
from tests.helpers import (
    assert_forward_matches,
    assert_training_step_matches,
    max_error,
    random_batch,
    small_config,
)

# Tiny model: the interpreter runs every kernel program in Python. head_dim 16 keeps tl.dot tiles >= 16.
CONFIG = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)


def twins(name, device):
    config = small_config(**CONFIG)
    reference = getattr(transformers, name)(config).to(device).eval()
    fast = getattr(fastbert, name)(config).to(device).eval()
    fast.load_state_dict(reference.state_dict())
    return config, reference, fast


def on(device, batch):
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("lengths", [[8, 8], [8, 3], [5, 1]])
def test_forward_matches_transformers_on_triton(device, lengths):
    config, reference, fast = twins("BertModel", device)
    batch = on(device, random_batch(config, 2, 8, lengths=lengths))
    out, ref = assert_forward_matches(reference, fast, batch, "triton", atol=1e-4)
    assert max_error(out.pooler_output, ref.pooler_output) <= 1e-4


def test_training_step_matches_transformers_on_triton(device):
    config, reference, fast = twins("BertForSequenceClassification", device)
    batch = on(device, dict(random_batch(config, 2, 8, lengths=[8, 4]), labels=torch.tensor([0, 1])))
    assert_training_step_matches(reference, fast, batch, "triton", atol=1e-4)
