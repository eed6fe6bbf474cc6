"""What the Triton kernels can take, stated next to them and readable without importing triton.

The registrations in fastbert/ops/<op>.py read these; the kernels' launchers check them too, so a
direct call past a limit raises instead of spilling or computing garbage.
"""
from __future__ import annotations

import torch

DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
# CUDA tensors; CPU tensors only in the interpreter (see cpu_problem).
DEVICES = frozenset({"cuda", "cpu"})

# add_layer_norm holds a row in registers: at 8192 the backward's row plus three column sums spill even
# at 32 warps (AOT: ~400-700 bytes). Wider rows would need memory-resident partial sums (not done).
LAYER_NORM_MAX_WIDTH = 4096
# Attention pads head_dim to a power of two >= 16 (BLOCK_D) and has tile configs up to 128.
ATTENTION_MAX_HEAD_DIM = 128


def cpu_problem(device: str, interpreting: bool) -> str | None:
    """Triton runs CPU tensors only in its interpreter."""
    if device == "cpu" and not interpreting:
        return ("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1, set before the first fastbert call, "
                "for the CPU interpreter)")
    return None


def layer_norm_width_problem(width: int) -> str | None:
    if width > LAYER_NORM_MAX_WIDTH:
        return f"its add_layer_norm kernel takes rows of at most {LAYER_NORM_MAX_WIDTH} elements, got {width}"
    return None


def attention_head_dim_problem(head_dim: int) -> str | None:
    if head_dim > ATTENTION_MAX_HEAD_DIM:
        return f"its attention kernel takes head_dim up to {ATTENTION_MAX_HEAD_DIM}, got {head_dim}"
    return None
