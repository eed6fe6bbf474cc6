"""rotary: rotary position embeddings (RoPE) on packed query and key, inside the fused QKV output.

qkv is (tokens, 3, heads, head_dim), as one QKV GEMM writes it; query and key are rotated by each
token's angle, value is copied, so the three stay views of one buffer with one row stride (what the
varlen attention kernels read without copies). The rotation is transformers' "rotate half" form:
with x = [x1 | x2], x1 * cos - x2 * sin and x2 * cos + x1 * sin.

cos and sin are (tokens, head_dim // 2): one row per token, for its position. `rotary_positions`
numbers the packed tokens per sequence from cu_seqlens; `RotaryTables` keeps the cos/sin of positions
0..n-1 per inverse-frequency vector and grows them when a longer sequence comes.
"""
from __future__ import annotations

import torch

from fastbert import backend
from fastbert.ops._dispatch import compute_dtype, implementation
from fastbert.ops._shared import register_torch_and_triton
from fastbert.ops.tensor_memo import TensorMemo


def rotary_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference: fp32 math for half inputs, result in qkv's dtype. The fallback and the test oracle."""
    math_dtype = compute_dtype(qkv.dtype)
    first, second = qkv[:, :2].to(math_dtype).chunk(2, dim=-1)
    cos, sin = (t.to(math_dtype)[:, None, None, :] for t in (cos, sin))
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return torch.cat((rotated.to(qkv.dtype), qkv[:, 2:]), dim=1)


def _rotary_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The "torch" backend: the reference when autograd records or for half inputs (fp32 math); else
    five passes written straight into the output (the reference's temporaries and two cats cost ~2x)."""
    if qkv.dtype not in (torch.float32, torch.float64) or backend.records_autograd(qkv):
        return rotary_ref(qkv, cos, sin)
    half = qkv.shape[-1] // 2
    out = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    first, second = qkv[:, :2, :, :half], qkv[:, :2, :, half:]
    cos, sin = (t.to(qkv.dtype)[:, None, None, :] for t in (cos, sin))
    torch.mul(first, cos, out=out[:, :2, :, :half]).addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=out[:, :2, :, half:]).addcmul_(first, sin)
    out[:, 2] = qkv[:, 2]
    return out


register_torch_and_triton("rotary", "fastbert.ops.rotary:_rotary_torch", "fastbert.kernels.rotary:rotary_triton")
# Until the hand-kept order in fastbert/backend.py names this op: Triton first on CUDA.


def _check_arguments(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if qkv.dim() != 4 or qkv.shape[1] != 3 or qkv.shape[-1] % 2:
        raise ValueError(f"qkv must be (tokens, 3, heads, head_dim) with an even head_dim, got {tuple(qkv.shape)}")
    expected = (qkv.shape[0], qkv.shape[-1] // 2)
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != expected:
            raise ValueError(f"{name} must have shape (tokens, head_dim // 2) = {expected}, got {tuple(table.shape)}")


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qkv (tokens, 3, heads, head_dim) with query and key rotated by (cos, sin) (tokens, head_dim // 2).

    cos and sin are constants (computed from positions): no gradient flows to them.
    """
    _check_arguments(qkv, cos, sin)
    return implementation("rotary", qkv, head_dim=qkv.shape[-1])(qkv, cos.detach(), sin.detach())


def rotary_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: each packed token's position within its own sequence (0, 1, ... per sequence)."""
    lengths = cu_seqlens.diff().long()
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                       output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[sequence]


class RotaryTables:
    """cos/sin of positions 0..n-1 for each inverse-frequency vector, computed once per length.

    Angles are position * inv_freq in fp32, as transformers computes them, so the tables match its
    cos/sin exactly. Entries are keyed by the inv_freq tensor (TensorMemo: weakly, with its version counter), so a
    changed or dropped buffer never serves stale tables.
    """

    def __init__(self):
        self._tables = TensorMemo()

    def get(self, inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (>= length, head_dim // 2) fp32 on inv_freq's device."""
        cached = self._tables.get(inv_freq, "tables")
        if cached is not None and cached[0].shape[0] >= length:
            return cached
        angles = torch.arange(length, device=inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
        return self._tables.put(inv_freq, "tables", (angles.cos(), angles.sin()))

    def lookup(self, inv_freq: torch.Tensor, positions: torch.Tensor, length: int):
        """(cos, sin) rows for `positions` (tokens,), all below `length`: each (tokens, head_dim // 2)."""
        cos, sin = self.get(inv_freq, length)
        return cos.index_select(0, positions), sin.index_select(0, positions)
