"""Numerical safety: fully padded rows, large activations in bf16/fp16, LayerNorm eps in fp32 statistics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert.ops import add_layer_norm
from tests.helpers import max_error, random_batch, small_config

CONFIG = small_config()
# Dtypes the CPU kernels of each backend take (the cpp kernels take fp32 and bf16 only).
HALF_DTYPES = {"torch": (torch.bfloat16, torch.float16), "cpp": (torch.bfloat16,)}


def _model(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    return fastbert.BertModel(config).eval()


def _batch(lengths, seqlen=12, seed=0):
    return random_batch(CONFIG, len(lengths), seqlen, lengths=lengths, generator=torch.Generator().manual_seed(seed))


def _with_padding_row(batch, position):
    """The batch with one extra all-padding row inserted at `position`."""
    out = {}
    for key, value in batch.items():
        extra = torch.zeros_like(value[:1]) if key == "attention_mask" else value[:1]
        out[key] = torch.cat([value[:position], extra, value[position:]])
    return out


@pytest.mark.parametrize("lengths", [[12, 12, 12], [12, 5, 1], [3, 12, 7]], ids=["no-padding", "right", "mixed"])
@pytest.mark.parametrize("position", [0, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_padding_row_is_finite_and_changes_no_other_row(cpu_backend, lengths, position, dtype):
    model = _model().to(dtype)
    batch = _batch(lengths)
    padded = _with_padding_row(batch, position)
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True)
        extra = model(**padded, output_hidden_states=True)
    others = [i for i in range(len(lengths) + 1) if i != position]
    for name in ("last_hidden_state", "pooler_output"):
        value = getattr(extra, name)
        assert torch.isfinite(value).all(), name
        assert max_error(value[others], getattr(plain, name)) <= (1e-5 if dtype == torch.float32 else 2e-2), name
    for layer, hidden in enumerate(extra.hidden_states):
        assert torch.isfinite(hidden).all() and not hidden[position].any(), f"hidden_states[{layer}]"


def test_all_padding_batch_gives_zeros_and_finite_pooler(cpu_backend):
    model = _model()
    batch = _batch([5, 5])
    batch["attention_mask"].zero_()
    with torch.no_grad():
        out = model(**batch)
    assert not out.last_hidden_state.any()
    assert torch.isfinite(out.pooler_output).all()


def test_all_padding_row_gives_finite_gradients(cpu_training_backend):
    model = _model().train()
    batch = _with_padding_row(_batch([12, 5, 1]), 1)
    out = model(**batch)
    (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def _large_layer_norm_model():
    """Every LayerNorm weight 1e4: the hidden states entering each layer are ~1e4."""
    model = _model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1e4)
    return model


@pytest.mark.parametrize("how", ["layer-norm-weights-1e4", "inputs-embeds-x1e4"])
def test_large_activations_stay_finite_in_half_precision(cpu_backend, how):
    base = _large_layer_norm_model() if how.startswith("layer") else _model()
    batch = _batch([12, 5, 1])
    keep = batch["attention_mask"].bool()
    inputs = dict(batch)
    if how.startswith("inputs"):
        inputs = dict(attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
        inputs["inputs_embeds"] = base.embeddings.word_embeddings(batch["input_ids"]).detach() * 1e4
    with torch.no_grad():
        full = base(**inputs).last_hidden_state
    assert torch.isfinite(full).all()
    scale = full[keep].abs().max().item()
    for dtype in HALF_DTYPES[cpu_backend]:
        model = copy.deepcopy(base).to(dtype)
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        with torch.no_grad():
            low = model(**cast).last_hidden_state
        assert torch.isfinite(low).all(), f"{dtype}: inf/NaN where fp32 is finite"
        assert max_error(low[keep], full[keep]) <= 0.05 * scale, dtype


def _layer_norm_fp64(x, weight, bias, eps):
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double(), eps)


def _check_layer_norm(x, eps=1e-12, tolerance=2e-2):
    width = x.shape[-1]
    weight = torch.linspace(0.5, 1.5, width).to(x.dtype)
    bias = torch.linspace(-0.1, 0.1, width).to(x.dtype)
    out = add_layer_norm(x, None, weight, bias, eps)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    assert max_error(out, _layer_norm_fp64(x, weight, bias, eps)) <= tolerance


def test_layer_norm_eps_holds_when_the_variance_underflows_in_bf16(cpu_backend):
    # std 1e-22: the variance (1e-44) is below bf16's smallest subnormal: only eps=1e-12 keeps the
    # division finite, and the result is the bias (as in fp64).
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e-22).to(torch.bfloat16)
    _check_layer_norm(x)


def test_layer_norm_statistics_survive_bf16_cancellation(cpu_backend):
    # Values 256 or 258 (bf16's spacing at 256 is 2): the variance is 1, but E[x^2] - E[x]^2 in bf16
    # is 0, which would blow the output up to ~1e6. fp32 statistics give +-1.
    pattern = torch.tensor([256.0, 258.0]).repeat(4, 32)
    _check_layer_norm(pattern.to(torch.bfloat16))
    shifted = 1000.0 + torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 8
    _check_layer_norm(shifted.to(torch.bfloat16), tolerance=5e-2)


def test_layer_norm_eps_holds_when_the_variance_underflows_in_fp16():
    # std 1e-4: the variance 1e-8 is below fp16's smallest subnormal (6e-8) and eps=1e-12 is 0 in
    # fp16, so fp16 statistics divide by zero. (The cpp kernels do not take fp16: torch backend.)
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e-4).to(torch.float16)
    with fastbert.use_backend("torch"):
        _check_layer_norm(x, tolerance=5e-3)


def test_model_in_bf16_with_tiny_embeddings_matches_fp64(cpu_backend):
    # inputs_embeds ~1e-22 in bf16: the embedding LayerNorm sees a variance that underflows in bf16.
    base = _model()
    batch = _batch([12, 5, 1])
    keep = batch["attention_mask"].bool()
    embeds = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(2)) * 1e-22
    # Word embeddings would dominate the tiny inputs: zero the position and type tables too.
    with torch.no_grad():
        base.embeddings.position_embeddings.weight.zero_()
        base.embeddings.token_type_embeddings.weight.zero_()
    low, high = copy.deepcopy(base).to(torch.bfloat16), copy.deepcopy(base).double()
    with torch.no_grad():
        out = low(inputs_embeds=embeds.to(torch.bfloat16), attention_mask=batch["attention_mask"]).last_hidden_state
        with fastbert.use_backend("torch"):
            ref = high(inputs_embeds=embeds.double(), attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.isfinite(out).all()
    assert max_error(out[keep], ref[keep]) <= 5e-2
