"""Triton flash attention (fastbert.kernels.attention) against the float64 references.

Run on CPU in its own invocation:  TRITON_INTERPRET=1 python -m pytest tests/kernels -k attention
(on a CUDA machine it runs on the GPU, bf16 included). Shapes are tiny: the interpreter runs the
kernels with 16 x 16 tiles, so lengths 1, 7, 20, 33 still cross several blocks.

Tolerance (as flash-attention's tests): err(triton, fp64 ref) <= 2 * err(torch backend same dtype,
fp64 ref) + atol, with atol per dtype in ATOL, for the output and dq, dk, dv.
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert.kernels.host import triton_interpreting
from fastbert.ops.attention import attention_ref, varlen_attention_ref
from tests.helpers import ATOL, assert_close_to_ref, max_error

INTERPRET = triton_interpreting()
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip(
        "Triton attention tests need CUDA or TRITON_INTERPRET=1 (run them in their own invocation: "
        "TRITON_INTERPRET=1 python -m pytest tests/kernels -k attention)",
        allow_module_level=True,
    )
pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
# bf16 tl.dot is wrong under the interpreter (the kernel upcasts there); bf16 is checked on CUDA and by AOT.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
def _leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _run(backend, fn, inputs, grad, **kwargs):
    """(out, dq, dk, dv) of fn on fresh leaf copies of inputs under `backend` (None: no backend switch)."""
    leaves = _leaves(*inputs[:3], dtype=grad.dtype)
    if backend is None:
        out = fn(*leaves, *inputs[3:], **kwargs)
    else:
        with fastbert.use_backend(backend):
            out = fn(*leaves, *inputs[3:], **kwargs)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check(fn, ref_fn, inputs, dtype, **kwargs):
    """Triton vs torch backend (same dtype) vs float64 reference: output and the three gradients."""
    torch.manual_seed(1)
    grad = torch.randn(inputs[0].shape, device=DEVICE)
    ref = _run(None, ref_fn, [inputs[0].double(), inputs[1].double(), inputs[2].double(), *inputs[3:]],
               grad.double(), **kwargs)
    fast = _run("triton", fn, inputs, grad.to(dtype), **kwargs)
    base = _run("torch", fn, inputs, grad.to(dtype), **kwargs)
    for name, f, b, r in zip(("out", "dq", "dk", "dv"), fast, base, ref):
        assert f.dtype == dtype and f.shape == r.shape
        assert_close_to_ref(f, b, r, ATOL[dtype], f"{name} {dtype}")
    return fast


def _padded_qkv(batch, heads, seq, head_dim, dtype=torch.float32):
    """q, k, v as (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim) tensors."""
    return [torch.randn(batch, seq, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2) for _ in range(3)]


def _packed_qkv(total, heads, head_dim, dtype=torch.float32):
    """q, k, v as strided views of one packed (total, 3, heads, head_dim) tensor."""
    qkv = torch.randn(total, 3, heads, head_dim, device=DEVICE).to(dtype)
    return [qkv[:, i] for i in range(3)]


def _mask(kind: str, batch: int, seq: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    lengths = torch.tensor([seq, seq - 4, 1, 0][:batch], device=DEVICE)
    positions = torch.arange(seq, device=DEVICE)[None, :]
    if kind == "right":
        return (positions < lengths[:, None]).long()
    if kind == "left":
        return positions >= (seq - lengths[:, None])
    if kind == "holes":  # every third token dropped, plus a run in the middle; last row fully masked
        keep = (positions % 3 != 1) & ~((positions >= 5) & (positions < 9))
        return keep.expand(batch, seq).clone().index_fill_(0, torch.tensor([batch - 1], device=DEVICE), False)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# Padded attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["none", "right", "left", "holes"])
def test_padded_matches_reference(dtype, kind):
    torch.manual_seed(0)
    batch, seq = 4, 33  # lengths 33, 29, 1, 0 ("holes": last row fully masked)
    q, k, v = _padded_qkv(batch, 2, seq, 32, dtype)
    _check(fastbert.ops.attention, attention_ref, [q, k, v, _mask(kind, batch, seq)], dtype)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128])
def test_head_dims(head_dim):
    torch.manual_seed(0)
    q, k, v = _padded_qkv(2, 1, 20, head_dim)
    _check(fastbert.ops.attention, attention_ref, [q, k, v, _mask("right", 2, 20)], torch.float32)


@pytest.mark.parametrize("seq", [1, 7, 17])
def test_odd_lengths_no_mask(seq):
    torch.manual_seed(0)
    q, k, v = _padded_qkv(2, 2, seq, 16)
    _check(fastbert.ops.attention, attention_ref, [q, k, v, None], torch.float32)


def test_softmax_scale_and_mixed_strides():
    """A non-default scale; q contiguous (batch, heads, seq, D), k and v transposed views, a sliced mask."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 20, 32, device=DEVICE)
    _, k, v = _padded_qkv(2, 2, 20, 32)
    mask = _mask("left", 2, 40)[:, ::2]
    _check(fastbert.ops.attention, attention_ref, [q, k, v, mask], torch.float32, softmax_scale=0.37)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    torch.manual_seed(0)
    q, k, v = _leaves(*_padded_qkv(2, 2, 20, 32))
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    with fastbert.use_backend("triton"):
        out = fastbert.ops.attention(q, k, v, mask, dropout_p=0.2)
    out.backward(torch.randn_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
        assert t.grad[0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Varlen attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_matches_reference(dtype):
    torch.manual_seed(0)
    lengths = [0, 1, 7, 33, 0, 16]
    cu_seqlens = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    q, k, v = _packed_qkv(sum(lengths), 2, 32, dtype)
    _check(fastbert.ops.varlen_attention, varlen_attention_ref, [q, k, v, cu_seqlens, max(lengths)], dtype)


def test_varlen_head_dim_80_and_scale():
    torch.manual_seed(0)
    cu_seqlens = torch.tensor([0, 5, 25], dtype=torch.int32, device=DEVICE)
    q, k, v = _packed_qkv(25, 2, 80)
    _check(fastbert.ops.varlen_attention, varlen_attention_ref, [q, k, v, cu_seqlens, 20], torch.float32,
           softmax_scale=0.2)


def test_empty_inputs():
    with fastbert.use_backend("triton"):
        q, k, v = _leaves(*_packed_qkv(0, 2, 32))
        out = fastbert.ops.varlen_attention(q, k, v, torch.zeros(3, dtype=torch.int32, device=DEVICE), 0)
        out.sum().backward()
        assert out.shape == (0, 2, 32) and q.grad.shape == q.shape
        q, k, v = _leaves(*_padded_qkv(2, 2, 0, 32))
        assert fastbert.ops.attention(q, k, v, torch.ones(2, 0, device=DEVICE)).shape == (2, 2, 0, 32)


# ---------------------------------------------------------------------------------------------
# Dropout: with v = identity, out = P * Z / (1 - p), which reveals the keep mask Z exactly; the same
# seed gives the same Z for any v, so the output and gradients can then be checked against a float64
# reference that applies Z explicitly.
# ---------------------------------------------------------------------------------------------
def _dropout_ref(q, k, v, keep, p, mask=None):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, -1) * keep / (1 - p)) @ v


def _recover_keep(run, q, k, mask, p):
    """Z (batch, heads, seq, seq) from a run with v = identity; checks out is exactly P*Z/(1-p)."""
    batch, heads, seq, head_dim = q.shape
    eye = torch.eye(seq, head_dim, device=DEVICE).expand(batch, heads, seq, head_dim)
    out = run(q, k, eye)[..., :seq].double()
    probs = _dropout_ref(q.double(), k.double(), eye.double()[..., :seq, :seq], 1.0, 0.0, mask)
    keep = out > 0.5 * probs / (1 - p)
    assert max_error(out, probs * keep / (1 - p)) < 1e-5
    return keep.double()


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_dropout_matches_reference_with_recovered_mask(varlen):
    p, heads, head_dim = 0.3, 2, 32
    if varlen:
        lengths = [7, 20]
        cu_seqlens = torch.tensor([0, 7, 27], dtype=torch.int32, device=DEVICE)
        mask = torch.arange(20, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]

        def run(q, k, v):  # padded (batch, heads, 20, D) <-> packed (27, heads, D)
            def pack(t):
                return t.transpose(1, 2)[mask]
            out = fastbert.ops.varlen_attention(pack(q), pack(k), pack(v), cu_seqlens, 20, dropout_p=p)
            padded = out.new_zeros(2, 20, heads, out.shape[-1]).index_put((mask,), out)
            return padded.transpose(1, 2)
    else:
        mask = _mask("holes", 2, 20)
        mask[1] = True

        def run(q, k, v):
            return fastbert.ops.attention(q, k, v, mask, dropout_p=p)

    # varlen: only the real tokens exist (no output, no gradient at padding)
    valid = mask[:, None, :, None] if varlen else torch.ones(1, dtype=torch.bool, device=DEVICE)
    torch.manual_seed(0)
    q, k, v = _leaves(*_padded_qkv(2, heads, 20, head_dim))
    with fastbert.use_backend("triton"):
        torch.manual_seed(123)
        keep = _recover_keep(run, q.detach(), k.detach(), mask, p)
        torch.manual_seed(123)
        out = run(q, k, v)
    grad = torch.randn_like(out) * valid
    out.backward(grad)
    q64, k64, v64 = _leaves(q, k, v, dtype=torch.float64)
    ref = _dropout_ref(q64, k64, v64, keep, p, mask)
    ref.backward(grad.double())
    for name, fast, r in (("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                          ("dv", v.grad, v64.grad)):
        assert max_error(fast * valid, r * valid) < 2e-5, name
    # Philox sanity: about 1 - p kept among attended pairs, different masks per head
    attended = mask[:, None, None, :].expand_as(keep) & valid
    assert abs(keep[attended].mean().item() - (1 - p)) < 0.06
    assert not torch.equal(keep[:, 0], keep[:, 1])


def test_dropout_keep_rate():
    """The recovered keep mask over 4 seeds x 2 x 2 x 32 x 32 pairs: kept fraction 1 - p within 7 sigma."""
    p = 0.4
    torch.manual_seed(0)
    q, k, _ = _padded_qkv(2, 2, 32, 32)
    with fastbert.use_backend("triton"):
        keeps = [_recover_keep(lambda q, k, v: fastbert.ops.attention(q, k, v, dropout_p=p), q, k, None, p)
                 for _ in range(4)]
    rate = torch.stack(keeps).mean().item()
    assert abs(rate - (1 - p)) < 7 * (p * (1 - p) / (4 * 2 * 2 * 32 * 32)) ** 0.5
    assert not torch.equal(keeps[0], keeps[1])


def test_dropout_seed_reproducible_and_mean_unbiased():
    torch.manual_seed(0)
    q, k, v = _padded_qkv(1, 1, 16, 16)
    with fastbert.use_backend("triton"):
        torch.manual_seed(7)
        a = fastbert.ops.attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(7)
        b = fastbert.ops.attention(q, k, v, dropout_p=0.5)
        c = fastbert.ops.attention(q, k, v, dropout_p=0.5)
        runs = torch.stack([fastbert.ops.attention(q, k, v, dropout_p=0.5) for _ in range(100)]).double()
    assert torch.equal(a, b) and not torch.equal(a, c)
    ref = attention_ref(q.double(), k.double(), v.double())
    # the mean over seeds approaches the no-dropout output: within 5 standard errors everywhere
    stderr = runs.std(0) / runs.shape[0] ** 0.5
    assert ((runs.mean(0) - ref).abs() <= 5 * stderr + 1e-6).all()


# ---------------------------------------------------------------------------------------------
# Determinism, torch.library registration
# ---------------------------------------------------------------------------------------------
def test_backward_is_deterministic():
    torch.manual_seed(0)
    q, k, v = _padded_qkv(2, 2, 33, 32)
    mask = _mask("holes", 2, 33)
    grad = torch.randn(2, 2, 33, 32, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(5)
            results.append(_run("triton", fastbert.ops.attention, [q, k, v, mask], grad, dropout_p=0.1))
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_opcheck_and_compile_without_graph_breaks():
    from fastbert.kernels import attention as kernels

    torch.manual_seed(0)
    q, k, v = _leaves(*_packed_qkv(12, 2, 16))
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.fastbert.triton_flash_attention_fwd.default,
                          (q, k, v, None, cu_seqlens, 7, 0.25, 0.0, None))

    def f(q, k, v, mask):
        return kernels.attention_triton(q, k, v, mask, softmax_scale=None, dropout_p=0.0).sum()

    qp, kp, vp = _leaves(*_padded_qkv(2, 2, 16, 16))
    mask = _mask("right", 2, 16)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(qp, kp, vp, mask), f(qp, kp, vp, mask))
