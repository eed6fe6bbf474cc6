"""What several op modules share: their "torch" and "triton" registrations, and the per-sequence loop of the
packed-attention references."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from fastbert.backend import REGISTRY, runs_anywhere, triton_probe
from fastbert.kernels import limits as triton_limits
from fastbert.ops._dispatch import compute_dtype
from fastbert.registry import Implementation, Signature


def triton_cpu_problem(call: Signature) -> str | None:
    """The Triton kernels' one limit on every op: CPU tensors only in the interpreter."""
    return triton_limits.cpu_problem(call.device, call.interpreting)


def triton_attention_problem(call: Signature) -> str | None:
    """The Triton attention kernels' limits: CUDA (or the interpreter) and head_dim."""
    return triton_cpu_problem(call) or triton_limits.attention_head_dim_problem(call.head_dim)


def register_torch_and_triton(op: str, torch_target: str, triton_target: str, *,
                              triton_supports: Callable = triton_cpu_problem, binder: str | None = None) -> None:
    """Register `op`'s "torch" implementation (any device and dtype) and then its "triton" one (the Triton
    kernels' devices and dtypes, per-call limits `triton_supports`); targets and binder as in
    registry.Implementation, the binder shared by both."""
    REGISTRY.register(Implementation(
        op=op, backend="torch", target=torch_target, devices=None, dtypes=None, probe=runs_anywhere, binder=binder,
    ))
    REGISTRY.register(Implementation(
        op=op, backend="triton", target=triton_target, devices=triton_limits.DEVICES, dtypes=triton_limits.DTYPES,
        probe=triton_probe, supports=triton_supports, binder=binder,
    ))


def packed_attention_ref(q, k, v, cu_seqlens, *, softmax_scale=None, dropout_p=0.0,
                         adjust_scores: Callable | None = None) -> torch.Tensor:
    """Reference attention on packed tokens (total_tokens, heads, head_dim), one sequence at a time, with
    explicit scores: softmax(adjust_scores(q k^T * scale, start, end)) v over the tokens [start, end) of each
    sequence (scores (heads, length, length); adjust_scores None: as they are). fp32 math for half inputs
    (fp64 stays fp64), the result in q's dtype; no sequence: zeros of q's shape."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    math_dtype = compute_dtype(q.dtype)
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        one_q, one_k, one_v = (t[start:end].to(math_dtype).transpose(0, 1) for t in (q, k, v))
        scores = torch.matmul(one_q, one_k.transpose(-1, -2)) * scale
        if adjust_scores is not None:
            scores = adjust_scores(scores, start, end)
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        outputs.append(torch.matmul(probs, one_v).transpose(0, 1).to(q.dtype))
    return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)
