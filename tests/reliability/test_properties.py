"""Property-based tests (hypothesis): fastbert equals the HuggingFace model / the op references.

Reproducible in CI: every test runs derandomized (the examples are a function of the test alone)
with no example database, and with no deadline (CPU timing noise is not a failure). The example
counts add up to 400; the whole file takes well under a minute on 2 cores, because the models are
tiny and built once per configuration (see _twins).
"""
from __future__ import annotations

import functools

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbert
from fastbert.ops import (
    add_layer_norm,
    attention,
    attention_ref,
    bias_gelu,
    varlen_attention,
    varlen_attention_ref,
)
from tests.helpers import ATOL, gelu_formula, layer_norm_formula, max_error
from tests.reliability._common import CPU_BACKENDS


def ci_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
BACKENDS = st.sampled_from(CPU_BACKENDS)


def assert_within_rule(fast, torch_same_dtype, ref64, name):
    """err(fast, fp64) <= 2 * err(torch same dtype, fp64) + ATOL[dtype], on finite values."""
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    fast_err, torch_err = max_error(fast, ref64), max_error(torch_same_dtype, ref64)
    atol = ATOL[fast.dtype]
    assert fast_err <= 2 * torch_err + atol, f"{name}: error {fast_err:.3g} > 2 * {torch_err:.3g} + {atol:g}"


def in_dtype(formula, dtype):
    """The formula in fp32 math (as the references compute half inputs), rounded once to `dtype`: what
    an exact op in that dtype gives. `formula(to)` casts each input with `to`."""
    return formula(torch.Tensor.float).to(dtype)


# ---- masks ---------------------------------------------------------------------------------------


@st.composite
def masks(draw, batch, seqlen):
    """(batch, seqlen) int masks: no padding, left / right padding, holes, with all-zero rows."""
    kind = draw(st.sampled_from(["none", "right", "left", "holes", "zero-rows"]))
    if kind == "none":
        return torch.ones(batch, seqlen, dtype=torch.long)
    if kind in ("right", "left"):
        lengths = torch.tensor(draw(st.lists(st.integers(0, seqlen), min_size=batch, max_size=batch)))
        positions = torch.arange(seqlen)[None]
        keep = positions < lengths[:, None] if kind == "right" else positions >= seqlen - lengths[:, None]
        return keep.long()
    bits = draw(st.lists(st.booleans(), min_size=batch * seqlen, max_size=batch * seqlen))
    mask = torch.tensor(bits, dtype=torch.long).view(batch, seqlen)
    if kind == "zero-rows":
        rows = draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=batch))
        mask[rows] = 0
    return mask


# ---- whole models --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _twins(heads: int, head_dim: int, layers: int, hidden_act: str):
    """(transformers fp32, transformers bf16, transformers fp64, fastbert fp32, fastbert bf16),
    one set of random weights per configuration, built once."""
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * heads * head_dim,
        max_position_embeddings=24,
        type_vocab_size=2,
        hidden_act=hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(heads * 1000 + head_dim * 10 + layers)
    reference = transformers.BertModel(config).eval()
    state = reference.state_dict()
    fast = fastbert.BertModel(config).eval()
    fast.load_state_dict(state)
    models = {
        ("hf", torch.float32): reference,
        ("hf", torch.bfloat16): transformers.BertModel(config).eval().to(torch.bfloat16),
        ("hf", torch.float64): transformers.BertModel(config).eval().double(),
        ("fast", torch.float32): fast,
        ("fast", torch.bfloat16): fastbert.BertModel(config).eval().to(torch.bfloat16),
    }
    for model in models.values():
        model.load_state_dict(state)
    return models


@ci_settings(140)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16, 32]),
    layers=st.integers(1, 2),
    hidden_act=st.sampled_from(["gelu", "gelu_new", "relu"]),
    dtype=DTYPES,
    backend=BACKENDS,
    batch=st.integers(1, 4),
    seqlen=st.integers(1, 16),
    data=st.data(),
)
def test_model_matches_transformers_on_real_tokens(
    heads, head_dim, layers, hidden_act, dtype, backend, batch, seqlen, data
):
    models = _twins(heads, head_dim, layers, hidden_act)
    mask = data.draw(masks(batch, seqlen), label="mask")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        input_ids=torch.randint(0, 50, (batch, seqlen), generator=g),
        token_type_ids=torch.randint(0, 2, (batch, seqlen), generator=g),
        attention_mask=mask,
    )
    with torch.no_grad():
        with fastbert.use_backend(backend):
            fast = models[("fast", dtype)](**inputs).last_hidden_state
        same_dtype = models[("hf", dtype)](**inputs).last_hidden_state
        ref64 = models[("hf", torch.float64)](**inputs).last_hidden_state
    keep = mask.bool()
    assert fast.shape == ref64.shape
    assert torch.isfinite(fast).all()
    assert not fast[~keep].any(), "padding positions must be zeros"
    assert_within_rule(fast[keep], same_dtype[keep], ref64[keep], f"{dtype} {backend}")


# ---- ops -----------------------------------------------------------------------------------------


@ci_settings(100)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    seqlen=st.integers(1, 20),
    head_dim=st.sampled_from([8, 16, 32, 64]),
    dtype=DTYPES,
    with_mask=st.booleans(),
    data=st.data(),
)
def test_attention_matches_reference(batch, heads, seqlen, head_dim, dtype, with_mask, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, generator=g) for _ in range(3))
    mask = data.draw(masks(batch, seqlen), label="mask") if with_mask else None
    low = [t.to(dtype) for t in (q, k, v)]
    out = attention(*low, mask)
    reference = attention_ref(q.double(), k.double(), v.double(), mask)
    assert_within_rule(out, attention_ref(*low, mask), reference, "attention")
    if mask is not None:
        assert not out[~mask.bool().any(-1)].any(), "rows without keys must be zeros"


@ci_settings(60)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([8, 16, 32]),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_varlen_attention_matches_padded_attention(lengths, heads, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    batch, max_seqlen, total = len(lengths), max(lengths), sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(dtype) for _ in range(3))
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    packed = varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    assert packed.shape == q.shape and torch.isfinite(packed).all()
    # The same tokens, padded on the right, through the padded entry point.
    mask = (torch.arange(max_seqlen)[None] < torch.tensor(lengths)[:, None]).long()
    indices = mask.flatten().nonzero().flatten()

    def padded(t):
        out = t.new_zeros(batch * max_seqlen, heads, head_dim).index_copy(0, indices, t)
        return out.view(batch, max_seqlen, heads, head_dim).transpose(1, 2)

    dense = attention(padded(q), padded(k), padded(v), mask).transpose(1, 2).reshape(-1, heads, head_dim)[indices]
    ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), cu_seqlens, max_seqlen)
    assert_within_rule(packed, dense, ref64, "varlen vs padded")
    assert_within_rule(packed, varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen), ref64, "varlen vs reference")


@ci_settings(50)
@given(
    rows=st.integers(1, 16),
    width=st.sampled_from([8, 64, 96, 384, 1000]),
    approximate=st.sampled_from(["none", "tanh"]),
    with_bias=st.booleans(),
    dtype=DTYPES,
    backend=BACKENDS,
    seed=st.integers(0, 2**16),
)
def test_bias_gelu_matches_reference(rows, width, approximate, with_bias, dtype, backend, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * 3
    bias = torch.randn(width, generator=g) if with_bias else None
    low_bias = bias.to(dtype) if bias is not None else None
    with fastbert.use_backend(backend):
        out = bias_gelu(x.to(dtype), low_bias, approximate)

    def formula(to):  # the "torch" backend is bias_gelu_ref itself: the baseline is the formula
        return gelu_formula(to(x.to(dtype)) + (0 if bias is None else to(low_bias)), approximate)

    assert_within_rule(out, in_dtype(formula, dtype), formula(torch.Tensor.double), "bias_gelu")


@ci_settings(50)
@given(
    rows=st.integers(1, 16),
    width=st.sampled_from([8, 64, 96, 384, 1000]),
    with_residual=st.booleans(),
    with_x_bias=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    eps=st.sampled_from([1e-12, 1e-5]),
    dtype=DTYPES,
    backend=BACKENDS,
    seed=st.integers(0, 2**16),
)
def test_add_layer_norm_matches_reference(rows, width, with_residual, with_x_bias, scale, eps, dtype, backend, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * scale
    residual = torch.randn(rows, width, generator=g) * scale if with_residual else None
    x_bias = torch.randn(width, generator=g) * scale if with_x_bias else None
    weight, bias = torch.randn(width, generator=g), torch.randn(width, generator=g)

    def low(t):
        return None if t is None else t.to(dtype)

    with fastbert.use_backend(backend):
        out = add_layer_norm(low(x), low(residual), low(weight), low(bias), eps, x_bias=low(x_bias))

    def formula(to):  # the "torch" backend is add_layer_norm_ref itself: the baseline is the formula
        def cast(t):
            return 0 if t is None else to(low(t))
        return layer_norm_formula(cast(x), cast(residual), cast(weight), cast(bias), eps, cast(x_bias))

    assert_within_rule(out, in_dtype(formula, dtype), formula(torch.Tensor.double), "add_layer_norm")


def test_every_cpu_backend_is_exercised():
    assert CPU_BACKENDS[0] == "torch"
    if fastbert.available_backends()["cpp"] is True:
        assert "cpp" in CPU_BACKENDS
    else:
        pytest.skip(f"cpp backend: {fastbert.available_backends()['cpp']}")
