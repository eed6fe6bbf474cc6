"""Triton RoPE on a packed QKV tensor: query and key rotated per token, value copied, fp32 math.

qkv is (tokens, 3, heads, head_dim) contiguous; cos and sin are (tokens, head_dim // 2) fp32. One
program per (token, q/k/v): a (heads, head_dim // 2) tile of each half. The rotation is transformers'
"rotate half": [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin]. Its inverse (the backward) is the
same rotation with -sin, so one kernel serves both (SIGN = +1 / -1); value's gradient passes through.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels._common import TRITON_TYPES, cast_for_store

NUM_WARPS = 4
NUM_STAGES = 1


@triton.jit
def _rotary_kernel(
    X,  # (T, 3, H, D) input (qkv, or the gradient of the output in the backward)
    COS, SIN,  # (T, D // 2) fp32
    Y,  # (T, 3, H, D) output, X's dtype
    H, HALF,  # heads, D // 2
    SIGN: tl.constexpr,  # +1 forward, -1 backward (rotation by -angle)
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token, part = tl.program_id(0), tl.program_id(1)  # part: 0 query, 1 key, 2 value
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    base = (token.to(tl.int64) * 3 + part) * H * 2 * HALF
    offsets = base + heads * (2 * HALF) + cols
    first = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(X + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
    if part < 2:
        cos = tl.load(COS + token.to(tl.int64) * HALF + cols, mask=cols < HALF, other=0.0)
        sin = tl.load(SIN + token.to(tl.int64) * HALF + cols, mask=cols < HALF, other=0.0) * SIGN
        first, second = first * cos - second * sin, second * cos + first * sin
    tl.store(Y + offsets, cast_for_store(first, Y), mask=mask)
    tl.store(Y + offsets + HALF, cast_for_store(second, Y), mask=mask)


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """Rotate query and key of x (tokens, 3, heads, head_dim) by sign * angle; value copied."""
    x = x.contiguous()
    tokens, _, heads, head_dim = x.shape
    y = torch.empty_like(x)
    if tokens and heads:
        cos, sin = (t.to(device=x.device, dtype=torch.float32).contiguous() for t in (cos, sin))
        _rotary_kernel[(tokens, 3)](
            x, cos, sin, y, heads, head_dim // 2, SIGN=sign, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_HALF=triton.next_power_of_2(max(head_dim // 2, 1)), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return y


@torch.library.custom_op("fastbert::triton_rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    return rotary_launch(x, cos, sin, sign)


@_rotary_op.register_fake
def _(x, cos, sin, sign):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, cos, sin, sign = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sign = sign


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return _rotary_op(grad, cos, sin, -ctx.sign), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


def rotary_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Differentiable RoPE of q and k inside qkv on Triton (the "triton" backend of fastbert.ops.rotary).
    cos and sin are constants: no gradient flows to them."""
    return _rotary_op(qkv, cos, sin, 1)


def _aot_cases() -> list[tuple]:
    """Each dtype forward at ModernBERT-base's shape (12 heads of 64), the backward (SIGN -1) in bf16,
    and a large head (16 of 128)."""
    variants = [(type_name, 1, 12, 64) for type_name in TRITON_TYPES.values()]
    variants += [("bf16", -1, 12, 64), ("bf16", 1, 16, 128)]
    cases = []
    for type_name, sign, heads, head_dim in variants:
        flags = {"SIGN": sign, "BLOCK_H": triton.next_power_of_2(heads), "BLOCK_HALF": head_dim // 2}
        signature = {"X": f"*{type_name}", "COS": "*fp32", "SIN": "*fp32", "Y": f"*{type_name}",
                     "H": "i32", "HALF": "i32"}
        cases.append(("rotary", _rotary_kernel, signature, flags, NUM_WARPS, NUM_STAGES))
    return cases


AOT_CASES = _aot_cases()
