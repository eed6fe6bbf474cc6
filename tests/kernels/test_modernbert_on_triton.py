"""A ModernBERT model running on the Triton kernels (rotary, geglu, window attention, varlen attention;
interpreter on CPU, or a GPU): forward parity with transformers under left and right padding, and a
training step's loss and gradients. Run in its own invocation with TRITON_INTERPRET=1."""
import pytest
import torch
import transformers

import fastbert
from tests.dropin._common import assert_grads_close, loss_and_grads
from tests.helpers import max_error, padding_mask

# Tiny: the interpreter runs every program in Python. head_dim 16 keeps tl.dot tiles >= 16; a window of
# |distance| <= 2 on 20-token sequences, layers global / local / local.
CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
              local_attention=4, global_attn_every_n_layers=3, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, sparse_prediction=False)


def twins(name, device):
    config = transformers.ModernBertConfig(**CONFIG)
    torch.manual_seed(0)
    reference = getattr(transformers, name)(config).to(device).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    fast = getattr(fastbert, name)(config).to(device).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def batch(device, side):
    mask = padding_mask([20, 7], 20, side)
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@pytest.mark.parametrize("side", ["right", "left"])
def test_modernbert_forward_matches_transformers_on_triton(device, side):
    reference, fast = twins("ModernBertModel", device)
    inputs = batch(device, side)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = reference(**inputs).last_hidden_state
        with fastbert.use_backend("triton"):
            out = fast(**inputs).last_hidden_state
    assert max_error(out[keep], ref[keep]) <= 1e-5 * max(1.0, ref.abs().max().item())


def test_modernbert_training_step_on_triton(device):
    reference, fast = twins("ModernBertForMaskedLM", device)
    reference.train()
    fast.train()
    inputs = batch(device, "right")
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    ref_loss, ref_grads = loss_and_grads(reference, inputs)
    with fastbert.use_backend("triton"):
        loss, grads = loss_and_grads(fast, inputs)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert_grads_close(grads, ref_grads, atol=1e-5)
