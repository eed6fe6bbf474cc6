"""Host-side helpers shared by the row-wise kernels (bias_gelu, add_layer_norm)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastbert.kernels.host import triton_interpreting

# Programs per SM for the kernels that loop over a block of rows and write per-program partial sums.
PROGRAMS_PER_SM = 4
# Under the interpreter (CPU tensors): a few programs, so the partial-sum path is still exercised.
INTERPRETER_PROGRAMS = 3

# The triton 3.9 interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even): when
# interpreting, kernels round by hand before the cast so that interpreter tests see GPU numerics.
ROUND_BF16_BY_HAND = tl.constexpr(triton_interpreting())

# torch dtype -> triton signature type, for the AOT cases.
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, width) contiguous view (or copy) of t; kernels index element (r, c) at r * width + c."""
    return t.reshape(-1, t.shape[-1]).contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def row_blocks(rows: int, device: torch.device, block_rows: int = 1) -> tuple[int, int]:
    """(programs, rows_per_program) for kernels that reduce over rows: each program owns a contiguous
    run of rows (a multiple of block_rows) and writes one partial sum, summed afterwards on the host."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else 0)
    else:
        target = INTERPRETER_PROGRAMS
    rows_per_program = triton.cdiv(triton.cdiv(max(rows, 1), target), block_rows) * block_rows
    return triton.cdiv(max(rows, 1), rows_per_program), rows_per_program


def optional_grad(t: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor | None:
    """grad cast to t's dtype, or None when t is absent."""
    return None if t is None else grad.to(t.dtype)


@triton.jit
def cast_for_store(value, PTR):
    # fp32 value -> PTR's element type, round to nearest even (done by hand for bf16 when interpreting).
    if ROUND_BF16_BY_HAND and PTR.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        value = bits.to(tl.float32, bitcast=True)
    return value.to(PTR.dtype.element_ty)
