"""Self-attention with padding: `attention` on padded (batch, heads, seq, head_dim) tensors with a
(batch, seq) key-padding mask, and `varlen_attention` on packed (total_tokens, heads, head_dim)
tensors described by cu_seqlens.

A query whose keys are all masked (a row of pure padding, an empty sequence) gets zeros and zero
gradients, never NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastbert import backend
from fastbert.backend import REGISTRY, cpp_probe, runs_anywhere, triton_probe
from fastbert.kernels import limits as triton_limits
from fastbert.ops._dispatch import compute_dtype, implementation
from fastbert.registry import Implementation, Signature


def _keep_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep (batch, seq) bool with empty rows opened up, has_key (batch,) bool).

    A row with no key would softmax over nothing (NaN); it attends to everything instead so that
    the math stays finite, and its output is zeroed by the caller.
    """
    keep = attention_mask.bool()
    has_key = keep.any(dim=-1)
    return keep | ~has_key[:, None], has_key


def _zero_empty_rows(out: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
    return torch.where(has_key[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def attention_ref(q, k, v, attention_mask=None, *, softmax_scale=None, dropout_p=0.0):
    """Reference: explicit softmax(q k^T * scale + mask) v in fp32 (fp64 for fp64 inputs)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    math_dtype = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(math_dtype), k.to(math_dtype).transpose(-1, -2)) * scale
    if attention_mask is not None:
        keep, has_key = _keep_mask(attention_mask)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v.to(math_dtype))
    if attention_mask is not None:
        out = _zero_empty_rows(out, has_key)
    return out.to(q.dtype)


def _attention_sdpa(q, k, v, attention_mask=None, *, softmax_scale=None, dropout_p=0.0):
    """The "torch" backend: PyTorch's scaled_dot_product_attention (fused kernels where it has them)."""
    if attention_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=softmax_scale)
    keep, has_key = _keep_mask(attention_mask)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=keep[:, None, None, :], dropout_p=dropout_p, scale=softmax_scale
    )
    return _zero_empty_rows(out, has_key)


def _packed_to_padded_index(cu_seqlens: torch.Tensor, max_seqlen: int, total: int):
    """For packed tokens: their row in a (batch * max_seqlen) padded layout, and the (batch, max_seqlen) mask."""
    lengths = cu_seqlens.diff().long()
    batch = lengths.numel()
    arange_batch = torch.arange(batch, device=cu_seqlens.device)
    sequence_of_token = torch.repeat_interleave(arange_batch, lengths, output_size=total)
    position = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[sequence_of_token]
    padded_row = sequence_of_token * max_seqlen + position
    mask = torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None]
    return padded_row, mask


def _per_sequence(attention_fn, q, k, v, cu_seqlens, *, softmax_scale=None, dropout_p=0.0):
    """Packed attention as one padded-attention call per sequence (no mask needed)."""
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # (1, heads, length, head_dim) views of this sequence
        one_q, one_k, one_v = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out = attention_fn(one_q, one_k, one_v, softmax_scale=softmax_scale, dropout_p=dropout_p)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)


def _varlen_attention_sdpa(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, dropout_p=0.0):
    """The "torch" backend for packed tokens.

    On CPU, one unmasked SDPA call per sequence: reading cu_seqlens costs nothing there, and unmasked
    SDPA takes PyTorch's fused CPU kernel (about 3x faster than a masked padded batch at BERT shapes).
    On other devices (a host sync per layer) and under torch.compile (a graph break per layer and a
    recompile per batch size): scatter into a padded batch, run masked SDPA, gather back.
    """
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return _per_sequence(_attention_sdpa, q, k, v, cu_seqlens, softmax_scale=softmax_scale, dropout_p=dropout_p)
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    padded_row, mask = _packed_to_padded_index(cu_seqlens, max_seqlen, total)

    def to_padded(t):
        padded = t.new_zeros(batch * max_seqlen, heads, head_dim).index_copy(0, padded_row, t)
        return padded.view(batch, max_seqlen, heads, head_dim).transpose(1, 2)

    out = _attention_sdpa(
        to_padded(q), to_padded(k), to_padded(v), mask, softmax_scale=softmax_scale, dropout_p=dropout_p
    )
    out = out.transpose(1, 2).reshape(batch * max_seqlen, heads, head_dim)
    return out.index_select(0, padded_row)


def varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, dropout_p=0.0):
    """Reference: attention_ref on each sequence in turn."""
    return _per_sequence(attention_ref, q, k, v, cu_seqlens, softmax_scale=softmax_scale, dropout_p=dropout_p)


def _triton_supports(call: Signature) -> str | None:
    return triton_limits.cpu_problem(call.device, call.interpreting) or triton_limits.attention_head_dim_problem(
        call.head_dim
    )


for _op, _torch_target, _triton_target in (
    ("attention", "_attention_sdpa", "attention_triton"),
    ("varlen_attention", "_varlen_attention_sdpa", "varlen_attention_triton"),
):
    REGISTRY.register(Implementation(
        op=_op, backend="torch", target=f"fastbert.ops.attention:{_torch_target}",
        devices=None, dtypes=None, probe=runs_anywhere,
    ))
    REGISTRY.register(Implementation(
        op=_op, backend="triton", target=f"fastbert.kernels.attention:{_triton_target}",
        devices=triton_limits.DEVICES, dtypes=triton_limits.DTYPES, probe=triton_probe, supports=_triton_supports,
    ))


def _refuse_autograd(call: Signature) -> str | None:
    return "the CPU attention kernel is inference-only (autograd is recording)" if call.grad else None


# fastbert._C's kernel: fp32 and bf16 inference. It claims no autograd (a recording call resolves to the
# next backend under "auto", and is refused with that reason under an explicit use_backend("cpp")).
REGISTRY.register(Implementation(
    op="varlen_attention", backend="cpp", target="fastbert.cpu.attention:varlen_attention_cpp",
    devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.bfloat16}), probe=cpp_probe,
    supports=_refuse_autograd,
))


def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    if any(t.dim() != rank for t in (q, k, v)) or not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must be {rank}-D {layout} of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_packed(q, k, v, cu_seqlens, max_seqlen, dropout_p: float) -> None:
    """The arguments every attention op on packed tokens takes (varlen, window, relative): clear errors naming
    the argument, the value and the rule."""
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    _check_dropout(dropout_p)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of length batch+1, "
            f"got dtype {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}"
        )
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")


def attention(q, k, v, attention_mask=None, *, softmax_scale=None, dropout_p=0.0):
    """Padded self-attention. q, k, v: (batch, heads, seq, head_dim); attention_mask: (batch, seq),
    1/True = keep (any padding side, holes allowed). Returns (batch, heads, seq, head_dim)."""
    _check_qkv(q, k, v, 4, "(batch, heads, seq, head_dim)")
    _check_dropout(dropout_p)
    if attention_mask is not None and tuple(attention_mask.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"attention_mask must have shape (batch, seq) = {(q.shape[0], q.shape[2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    run = implementation("attention", q, head_dim=q.shape[-1])
    return run(q, k, v, attention_mask, softmax_scale=softmax_scale, dropout_p=dropout_p)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, dropout_p=0.0):
    """Self-attention on packed tokens. q, k, v: (total_tokens, heads, head_dim); cu_seqlens: int32
    (batch+1,) prefix sums of the lengths; max_seqlen: the longest length. Returns q's shape."""
    check_packed(q, k, v, cu_seqlens, max_seqlen, dropout_p)
    grad = backend.records_autograd(q, k, v)
    run = implementation("varlen_attention", q, head_dim=q.shape[-1], grad=grad)
    return run(q, k, v, cu_seqlens, int(max_seqlen), softmax_scale=softmax_scale, dropout_p=dropout_p)
