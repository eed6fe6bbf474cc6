"""A RoBERTa-family model (fairseq positions, eps 1e-5, one token type) running entirely on the Triton
kernels (interpreter on CPU, or a GPU): forward parity with transformers under left padding with a
pad-id hole, and a training step's loss and gradients. Run in its own invocation with TRITON_INTERPRET=1."""
import pytest
import torch
import transformers

import fastbert
from tests.helpers import max_error, padding_mask

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
    inputs = batch(device, [8, 3], side)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = reference(**inputs)
        with fastbert.use_backend("triton"):
            out = fast(**inputs)
    assert max_error(out.last_hidden_state[keep], ref.last_hidden_state[keep]) <= 1e-4


def test_family_training_step_matches_transformers_on_triton(device):
    reference, fast = twins("XLMRobertaForSequenceClassification", device)
    inputs = dict(batch(device, [8, 4], "right"), labels=torch.tensor([0, 1], device=device))
    reference.train()
    fast.train()
    ref_loss = reference(**inputs).loss
    ref_loss.backward()
    with fastbert.use_backend("triton"):
        loss = fast(**inputs).loss
        loss.backward()
    assert max_error(loss, ref_loss) <= 1e-4
    ref_grads = dict(reference.named_parameters())
    for name, param in fast.named_parameters():
        scale = max(1.0, ref_grads[name].grad.abs().max().item())
        assert max_error(param.grad, ref_grads[name].grad) <= 1e-4 * scale, name
