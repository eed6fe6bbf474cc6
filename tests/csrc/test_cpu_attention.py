"""The CPU varlen attention kernel (fastbert._C, backend cpp) against a float64 reference."""
import math

import pytest
import torch

from fastbert import extension
from fastbert.ops import varlen_attention_ref
from tests.helpers import assert_close_to_ref

pytestmark = pytest.mark.skipif(extension.load_problem() is not None, reason=str(extension.load_problem()))


def cpp_attention(*args, **kwargs):
    from fastbert.ops.cpu_attention import varlen_attention_cpp

    return varlen_attention_cpp(*args, **kwargs)


def packed_qkv(lengths, heads, head_dim):
    """q, k, v as the (tokens, heads, head_dim) views of one fused (tokens, 3 * hidden) projection."""
    tokens, hidden = sum(lengths), heads * head_dim
    fused = torch.randn(tokens, 3 * hidden) * 2.0
    q, k, v = (t.view(tokens, heads, head_dim) for t in fused.chunk(3, dim=-1))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens


@pytest.mark.parametrize("lengths", [[1], [7, 0, 65], [64, 128, 3], [200, 31]])
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
    q, k, v, cu = packed_qkv([5, 9], 2, 8)
    q.requires_grad_()
    out = cpp_attention(q, k, v, cu, 9)
    out.sum().backward()
    assert q.grad is not None


def test_bad_cu_seqlens_raise():
    q, k, v, cu = packed_qkv([5, 9], 2, 8)
    with torch.no_grad(), pytest.raises(ValueError):
        cpp_attention(q, k, v, torch.tensor([0, 5, 20], dtype=torch.int32), 15)
    with torch.no_grad(), pytest.raises(ValueError):
        cpp_attention(q, k, v, cu, 4)  # a sequence longer than max_seqlen


def test_bf16_takes_the_torch_path_and_training_runs_under_cpp():
    import transformers

    import fastbert

    q, k, v, cu = packed_qkv([5, 9], 2, 8)
    with torch.no_grad():
        got = cpp_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, 9)
    assert got.dtype == torch.bfloat16
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = fastbert.patch(transformers.BertModel(config))
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with fastbert.use_backend("cpp"):
        model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert model.embeddings.word_embeddings.weight.grad is not None
