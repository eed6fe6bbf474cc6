"""qkv_attention: self-attention read straight from a fused QKV GEMM's output, for inference plans.

qkv: (tokens, 3 * heads * head_dim), the query, key and value blocks in that order, contiguous. A plan binds
the op once per model (`bind`: registry.Implementation.binder) into `Bound(dense, packed)`:
  dense(qkv, heads, head_dim, scale, batch, seqlen)          a batch without padding, seqlen tokens each
  packed(qkv, heads, head_dim, scale, cu_seqlens, max_seqlen) packed sequences (int32 cu_seqlens)
both returning the context (tokens, heads * head_dim).

"torch" and "triton": views of the three blocks handed to the registry's `attention` (dense; SDPA itself
under torch) and `varlen_attention` (packed), as resolved for the plan. "cpp" (fastbert/cpu/attention.py):
fastbert._C's kernel on the QKV buffer itself for sequences of at most machine.choice("fused_qkv_max_seqlen")
tokens (every length on a CPU without AMX, 32 with AMX, where SDPA's GEMMs run on AMX above that), the others
as "torch". Inference only: every implementation refuses calls that autograd records.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fastbert import backend
from fastbert.backend import REGISTRY, cpp_probe, runs_anywhere, triton_probe
from fastbert.kernels import limits as triton_limits
from fastbert.ops._dispatch import implementation
from fastbert.registry import Implementation, Signature


class Bound(NamedTuple):
    dense: Callable
    packed: Callable


def split(qkv: torch.Tensor, heads: int, head_dim: int):
    """(q, k, v) as (tokens, heads, head_dim) views of the fused output."""
    return qkv.view(qkv.shape[0], 3, heads, head_dim).unbind(1)


def qkv_attention_ref(qkv, heads, head_dim, scale, cu_seqlens, max_seqlen):
    """Reference (and the per-call use of "torch"/"triton"): the registry's varlen_attention on the views."""
    from fastbert.ops.attention import varlen_attention

    q, k, v = split(qkv, heads, head_dim)
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale).reshape(qkv.shape[0], -1)


def _dense(run: Callable | None) -> Callable:
    sdpa = torch._C._nn.scaled_dot_product_attention

    def dense(qkv, heads, head_dim, scale, batch, seqlen):
        q, k, v = qkv.view(batch, seqlen, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        context = sdpa(q, k, v, scale=scale) if run is None else run(q, k, v, None, softmax_scale=scale)
        return context.transpose(1, 2).reshape(batch * seqlen, heads * head_dim)

    return dense


def _packed(run: Callable) -> Callable:
    def packed(qkv, heads, head_dim, scale, cu_seqlens, max_seqlen):
        q, k, v = split(qkv, heads, head_dim)
        return run(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale).reshape(qkv.shape[0], heads * head_dim)

    return packed


def bind(run, like: torch.Tensor, head_size: int) -> Bound:
    """The binder of "torch" and "triton": the registry's attention ops for tensors like `like`, resolved once."""
    dense = None if backend.resolved_backend("attention", like, head_dim=head_size) == "torch" \
        else implementation("attention", like, head_dim=head_size)
    return Bound(_dense(dense), _packed(implementation("varlen_attention", like, head_dim=head_size)))


_bound: dict[tuple, Bound] = {}


def bound_for(like: torch.Tensor, head_dim: int) -> Bound:
    """The registry's qkv_attention bound for tensors like `like` (device, dtype), memoized per selection and
    registry generation: inference plans bind it once, and the general forward's inference calls run the same
    Bound, so both run the same kernels at every length."""
    key = (backend.REGISTRY.generation, backend.current_backend(), like.device.type, like.dtype, head_dim)
    found = _bound.get(key)
    if found is None:
        from fastbert.ops import _dispatch

        probe = like.new_empty(0)
        found = _bound[key] = _dispatch.bind("qkv_attention", probe, head_dim=head_dim, like=probe,
                                             head_size=head_dim)
    return found


def _refuse_autograd(call: Signature) -> str | None:
    return "attention on the fused QKV output is inference-only (autograd is recording)" if call.grad else None


def _triton_supports(call: Signature) -> str | None:
    return (_refuse_autograd(call) or triton_limits.cpu_problem(call.device, call.interpreting)
            or triton_limits.attention_head_dim_problem(call.head_dim))


BIND = "fastbert.ops.qkv_attention:bind"
REGISTRY.register(Implementation(
    op="qkv_attention", backend="torch", target="fastbert.ops.qkv_attention:qkv_attention_ref",
    devices=None, dtypes=None, probe=runs_anywhere, supports=_refuse_autograd, binder=BIND,
))
REGISTRY.register(Implementation(
    op="qkv_attention", backend="triton", target="fastbert.ops.qkv_attention:qkv_attention_ref",
    devices=triton_limits.DEVICES, dtypes=triton_limits.DTYPES, probe=triton_probe, supports=_triton_supports,
    binder=BIND,
))
REGISTRY.register(Implementation(
    op="qkv_attention", backend="cpp", target="fastbert.cpu.attention:fused_qkv_attention",
    devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.bfloat16}), probe=cpp_probe,
    supports=_refuse_autograd, binder="fastbert.cpu.attention:bind", note="fastbert.cpu.attention:binding_note",
))
