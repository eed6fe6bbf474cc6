"""varlen_attention on the "cpp" backend: fastbert._C's CPU kernel (csrc/cpu/attention.cpp).

fp32 or bf16 inference: one (sequence, head) per task, online softmax over key tiles, reading q/k/v
straight from the fused QKV output's views (no copies); bf16 inputs are widened to fp32 in the kernel,
scores, softmax and accumulation run in fp32 and the output is rounded to bf16 once.

The registry entry (fastbert/ops/attention.py) claims only what this kernel runs: CPU, fp32/bf16, no
autograd. Dropout and tracing by torch.compile, which the signature does not carry, run the torch
implementation here.
"""
from __future__ import annotations

import torch

from fastbert import backend, extension


def _shares_row_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """q, k, v are (tokens, heads, head_dim) with contiguous heads and one row stride."""
    heads, head_dim = q.shape[1], q.shape[2]
    return all(
        t.stride(2) == 1 and (t.stride(1) == head_dim or heads == 1) and t.stride(0) == q.stride(0)
        for t in (q, k, v)
    ) and q.stride(0) >= heads * head_dim


KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _needs_fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    records = backend.records_autograd(q, k, v)
    return q.dtype not in KERNEL_DTYPES or dropout_p > 0.0 or records or torch.compiler.is_compiling()


def _dtype_code(dtype: torch.dtype) -> int:
    module = extension.module()
    return module.FLOAT32 if dtype == torch.float32 else module.BFLOAT16


def varlen_attention_cpp(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, dropout_p=0.0):
    """Packed self-attention on fastbert._C. q, k, v: (tokens, heads, head_dim) fp32 or bf16 CPU, one dtype;
    returns the same shape and dtype."""
    if _needs_fallback(q, k, v, dropout_p):
        from fastbert.ops.attention import _varlen_attention_sdpa

        return _varlen_attention_sdpa(q, k, v, cu_seqlens, max_seqlen, softmax_scale=softmax_scale, dropout_p=dropout_p)
    if cu_seqlens.numel() < 1 or int(cu_seqlens[0]) < 0 or int(cu_seqlens[-1]) > q.shape[0]:
        raise ValueError(f"cu_seqlens must run from >= 0 to <= the {q.shape[0]} packed tokens")
    if not _shares_row_layout(q, k, v):
        q, k, v = (t.contiguous() for t in (q, k, v))
    tokens, heads, head_dim = q.shape
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype)
    cu_seqlens = cu_seqlens.contiguous()
    extension.module().varlen_attention_fwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), cu_seqlens.data_ptr(), cu_seqlens.numel() - 1,
        heads, head_dim, q.stride(0), int(max_seqlen), scale, _dtype_code(q.dtype), torch.get_num_threads(),
    )
    return out


# Sequences this short attend on score tiles of 16 or 32 keys (csrc/cpu/attention.cpp), where the kernel beats
# SDPA on every CPU measured (docs/perf-notes.md).
SHORT_SEQLEN = 32


def fused_qkv_max_seqlen() -> float:
    """The longest sequence the inference plan sends to `fused_qkv_attention` (longer ones go to SDPA): SHORT_SEQLEN
    on a CPU with AMX, where SDPA is faster above it; any length elsewhere, where the kernel was faster at every
    length measured (an AVX-512 AMD EPYC: 0.85-0.95x SDPA's forward time, 16-512 tokens, batch 1 and 8,
    docs/perf-notes.md). A row of the machine record's choices (fastbert/cpu/machine.py)."""
    from fastbert.cpu import machine

    return machine.choice("fused_qkv_max_seqlen")


def fused_qkv_attention(qkv: torch.Tensor, heads: int, head_dim: int, scale: float, cu_seqlens: torch.Tensor,
                        max_seqlen: int) -> torch.Tensor:
    """The kernel straight on a fused QKV GEMM's output, for the inference plan: qkv (tokens, 3 * heads *
    head_dim), contiguous fp32 or bf16 CPU, the query, key and value blocks in that order; cu_seqlens int32,
    contiguous, CPU. Returns the context (tokens, heads * head_dim). The kernel checks cu_seqlens itself."""
    if not qkv.is_contiguous() or qkv.shape[1] != 3 * heads * head_dim or qkv.dtype not in KERNEL_DTYPES:
        raise ValueError(f"fused_qkv_attention: qkv must be a contiguous fp32/bf16 (tokens, 3 * {heads} * {head_dim}) "
                         f"tensor, got {qkv.dtype} {tuple(qkv.shape)}")
    out = torch.empty(qkv.shape[0], heads * head_dim, dtype=qkv.dtype)
    base, block = qkv.data_ptr(), heads * head_dim * qkv.element_size()
    extension.module().varlen_attention_fwd(
        base, base + block, base + 2 * block, out.data_ptr(), cu_seqlens.data_ptr(), cu_seqlens.numel() - 1, heads,
        head_dim, 3 * heads * head_dim, max_seqlen, scale, _dtype_code(qkv.dtype), torch.get_num_threads(),
    )
    return out


def bind(run, like: torch.Tensor, head_size: int):
    """The "cpp" binder of qkv_attention (fastbert/ops/qkv_attention.py): the kernel on the QKV buffer for
    sequences of at most fused_qkv_max_seqlen() tokens (dense batches get cu_seqlens of equal lengths, kept per
    shape), the registry's attention ops for longer ones."""
    from fastbert.ops import qkv_attention

    longer, limit = qkv_attention.bind(None, like, head_size), fused_qkv_max_seqlen()
    offsets: dict[tuple[int, int], torch.Tensor] = {}  # (batch, seqlen) -> cu_seqlens of equal lengths

    def dense(qkv, heads, head_dim, scale, batch, seqlen):
        if seqlen > limit:
            return longer.dense(qkv, heads, head_dim, scale, batch, seqlen)
        cu_seqlens = offsets.get((batch, seqlen))
        if cu_seqlens is None:
            if len(offsets) > 64:
                offsets.clear()
            cu_seqlens = offsets[batch, seqlen] = torch.arange(batch + 1, dtype=torch.int32) * seqlen  # seqlen 0 too
        return run(qkv, heads, head_dim, scale, cu_seqlens, seqlen)

    def packed(qkv, heads, head_dim, scale, cu_seqlens, max_seqlen):
        if max_seqlen > limit:
            return longer.packed(qkv, heads, head_dim, scale, cu_seqlens, max_seqlen)
        return run(qkv, heads, head_dim, scale, cu_seqlens, max_seqlen)

    return qkv_attention.Bound(dense, packed)


def binding_note() -> str:
    """What `bind` runs on this machine (`fastbert info`)."""
    limit = fused_qkv_max_seqlen()
    lengths = "every length" if limit == float("inf") else f"at most {limit} tokens"
    return f"the kernel on the fused QKV buffer for sequences of {lengths}, longer ones as \"torch\" binds them"
