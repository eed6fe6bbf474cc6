"""The CPU varlen attention kernel (fastbert._C, backend cpp) against a float64 reference."""
import math

import pytest
import torch

from fastbert import extension
from fastbert.ops import varlen_attention_ref
from tests.helpers import (
    ATOL,
    assert_close_to_ref,
    check_against_reference,
    max_error,
    packed_attention_formula,
    packed_attention_probs,
)

pytestmark = pytest.mark.skipif(extension.load_problem() is not None, reason=str(extension.load_problem()))


def cpp_attention(*args, **kwargs):
    from fastbert.cpu.attention import varlen_attention_cpp

    return varlen_attention_cpp(*args, **kwargs)


def packed_qkv(lengths, heads, head_dim):
    """q, k, v as the (tokens, heads, head_dim) views of one fused (tokens, 3 * hidden) projection."""
    tokens, hidden = sum(lengths), heads * head_dim
    fused = torch.randn(tokens, 3 * hidden) * 2.0
    q, k, v = (t.view(tokens, heads, head_dim) for t in fused.chunk(3, dim=-1))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens


# max_seqlen <= 16 / <= 32 run score tiles of 16 / 32 keys (one / two vectors per row)
SHORT = [[16], [3, 16, 0, 9], [1, 1], [32, 17], [24]]


@pytest.mark.parametrize("lengths", [[1], [7, 0, 65], [64, 128, 3], [200, 31], *SHORT])
@pytest.mark.parametrize("heads,head_dim", [(1, 8), (2, 24), (3, 32), (4, 64)])
def test_matches_float64_reference(lengths, heads, head_dim):
    q, k, v, cu = packed_qkv(lengths, heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    with torch.no_grad():
        got = cpp_attention(q, k, v, cu, max(lengths), softmax_scale=scale)
        same_dtype = varlen_attention_ref(q, k, v, cu, max(lengths), softmax_scale=scale)
        ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), cu, max(lengths), softmax_scale=scale)
    assert got.is_contiguous()
    assert_close_to_ref(got, same_dtype, ref64)


def test_large_scores_stay_finite_and_contiguous_inputs_work():
    q, k, v, cu = packed_qkv([90, 40], 2, 16)
    q, k, v = (t.contiguous() * 30 for t in (q, k, v))  # scores in the thousands: the online max must hold
    with torch.no_grad():
        got = cpp_attention(q, k, v, cu, 90)
        ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), cu, 90)
    assert torch.isfinite(got).all()
    assert (got.double() - ref64).abs().max().item() <= 1e-3 * ref64.abs().max().item()


def test_autograd_and_dropout_calls_take_the_torch_path():
    q, k, v, cu = packed_qkv([5, 9], 2, 16)
    scale = 16**-0.5
    # Autograd: output and every gradient against the attention formula (fp32 baseline, fp64 reference).
    check_against_reference(lambda q, k, v: cpp_attention(q, k, v, cu, 9, softmax_scale=scale),
                            lambda q, k, v: packed_attention_formula(q, k, v, cu, scale), [q, k, v],
                            ATOL[torch.float32], names="qkv")
    # Dropout (no autograd): with v[token] = one-hot of its position, each output row is its row of dropped
    # probabilities, so every entry must be 0 or the exact probability / (1 - p).
    p = 0.5
    v = torch.cat([torch.eye(16)[:length] for length in (5, 9)])[:, None, :].expand(14, 2, 16).contiguous()
    with torch.no_grad():
        out = cpp_attention(q, k, v, cu, 9, softmax_scale=scale, dropout_p=p)
    probs = packed_attention_probs(q.double(), k.double(), cu, scale)  # per sequence (heads, length, length)
    rows = [out[a:b, :, :b - a].double().transpose(0, 1) for a, b in ((0, 5), (5, 14))]
    assert not out[:5, :, 5:].any(), "a 5-token sequence attended beyond its keys"
    for got, want in zip(rows, probs):
        kept = got != 0
        torch.testing.assert_close(got[kept], want[kept] / (1 - p), rtol=1e-5, atol=1e-6,
                                   msg="a kept probability is not scaled by 1 / (1 - p)")
    kept_fraction = torch.cat([(r != 0).flatten() for r in rows]).double().mean().item()
    assert 0.3 < kept_fraction < 0.7, f"{kept_fraction:.2f} of the probabilities kept with dropout_p={p}"


def test_bad_cu_seqlens_raise():
    q, k, v, cu = packed_qkv([5, 9], 2, 8)
    with torch.no_grad(), pytest.raises(ValueError):
        cpp_attention(q, k, v, torch.tensor([0, 5, 20], dtype=torch.int32), 15)
    with torch.no_grad(), pytest.raises(ValueError):
        cpp_attention(q, k, v, cu, 4)  # a sequence longer than max_seqlen


# bf16: inputs rounded to bf16, fp32 math inside; the output's own rounding (2^-8 relative) dominates.
BF16_ATOL = 2e-2


@pytest.mark.parametrize("lengths", [[1], [7, 0, 65], [64, 128, 3], *SHORT])
@pytest.mark.parametrize("heads,head_dim", [(2, 24), (3, 32), (4, 64)])
def test_bf16_runs_the_kernel_and_matches_float64_reference(lengths, heads, head_dim, monkeypatch):
    import importlib

    attention_module = importlib.import_module("fastbert.ops.attention")

    def no_fallback(*args, **kwargs):
        raise AssertionError("bf16 inference must run the kernel, not the torch fallback")

    q, k, v, cu = packed_qkv(lengths, heads, head_dim)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    with torch.no_grad():
        same_dtype = varlen_attention_ref(q, k, v, cu, max(lengths))
        ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), cu, max(lengths))
        monkeypatch.setattr(attention_module, "_varlen_attention_sdpa", no_fallback)
        got = cpp_attention(q, k, v, cu, max(lengths))
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    assert_close_to_ref(got, same_dtype, ref64, atol=BF16_ATOL)
    # fp32 accumulation: no worse than rounding the exact answer to bf16, plus one bf16 step
    rounding = (ref64.bfloat16().double() - ref64).abs().max().item()
    assert (got.double() - ref64).abs().max().item() <= rounding + 2 ** -7 * ref64.abs().max().item()


def test_registry_does_not_claim_autograd():
    import fastbert
    from fastbert.backend import REGISTRY, BackendUnavailableError
    from fastbert.registry import Signature

    entry = REGISTRY.get("varlen_attention", "cpp")
    assert entry.problem(Signature("varlen_attention", "cpu", torch.bfloat16, head_dim=64)) is None
    assert "inference-only" in entry.problem(Signature("varlen_attention", "cpu", torch.float32, grad=True))
    q, k, v, cu = packed_qkv([5, 9], 2, 8)
    q.requires_grad_()
    with fastbert.use_backend("cpp"), pytest.raises(BackendUnavailableError, match="inference-only"):
        fastbert.ops.varlen_attention(q, k, v, cu, 9)
    fastbert.ops.varlen_attention(q, k, v, cu, 9).sum().backward()  # "auto": the torch implementation
    assert q.grad is not None


def test_training_runs_under_auto():
    import transformers

    import fastbert

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = transformers.BertModel(config).double()  # transformers' own forward, in fp64
    model = fastbert.patch(transformers.BertModel(config))
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    keep = mask.bool()
    weights = torch.randn(int(keep.sum()), 16, dtype=torch.float64)  # a random loss over the real tokens
    for m in (model, reference):
        (m(input_ids=ids, attention_mask=mask).last_hidden_state[keep].double() * weights).sum().backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        want = reference_grads[name].grad
        if want is None:  # the pooler: not in the loss
            assert parameter.grad is None, f"{name} has a gradient transformers does not give"
            continue
        assert parameter.grad is not None, f"no gradient for {name}"
        # fp32 against fp64: 1e-5 x max(1, |grad|) (measured: 1.5e-7 x that scale)
        error, bound = max_error(parameter.grad, want), 1e-5 * max(1.0, want.abs().max().item())
        assert error <= bound, f"grad of {name}: error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_attention_reads_the_fused_projection(dtype):
    from fastbert.cpu.attention import fused_qkv_attention

    heads, head_dim, lengths = 3, 32, [16, 5]
    q, k, v, cu = packed_qkv(lengths, heads, head_dim)
    fused = q.as_strided((sum(lengths), 3 * heads * head_dim), (3 * heads * head_dim, 1)).to(dtype)
    q, k, v = (t.view(sum(lengths), heads, head_dim) for t in fused.float().chunk(3, dim=-1))
    with torch.no_grad():
        got = fused_qkv_attention(fused, heads, head_dim, head_dim ** -0.5, cu, 16)
        ref64 = varlen_attention_ref(q.double(), k.double(), v.double(), cu, 16)
    assert got.shape == (21, heads * head_dim) and got.dtype == dtype
    tolerance = BF16_ATOL if dtype == torch.bfloat16 else 1e-5
    assert (got.double() - ref64.reshape(21, -1)).abs().max().item() <= tolerance * ref64.abs().max().item()
    with pytest.raises(ValueError, match="contiguous"):
        fused_qkv_attention(fused[:, :-1], heads, head_dim, 1.0, cu, 16)
