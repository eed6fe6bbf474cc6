"""bias_gelu on the extension's kernels (backends "cpp" and "cuda").

Ops: extension_bias_gelu_fwd(x, bias?, approximate) -> y
     extension_bias_gelu_bwd(dy, x, bias?, approximate, need_dbias) -> (dx, dbias fp32 | empty)
"""
# No `from __future__ import annotations` here: torch.library infers the op schemas from real types.
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert.ops.extension import _common as common

OP = "bias_gelu"


def _validate(x: Tensor, bias: Optional[Tensor], approximate: str) -> None:
    common.check_input(OP, x)
    common.check_same_device(OP, x, bias=bias)
    common.check_vector(OP, "bias", bias, x.shape[-1])
    common.gelu_code(approximate)


def _forward(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    _validate(x, bias, approximate)
    x = x.contiguous()
    y = torch.empty_like(x)
    rows, cols = common.rows_cols(x)
    if rows == 0 or cols == 0:
        return y
    b = common.f32(bias)
    args = (x.data_ptr(), common.ptr(b), y.data_ptr(), rows, cols, common.dtype_code(x.dtype),
            common.gelu_code(approximate))
    if x.is_cuda:
        with torch.cuda.device(x.device):
            kernels, stream, _ = common.cuda_context(x)
            kernels.bias_gelu_fwd(*args, stream)
    else:
        common.loader.module().bias_gelu_fwd(*args, torch.get_num_threads())
    return y


bias_gelu_fwd = torch.library.custom_op("fastbert::extension_bias_gelu_fwd", mutates_args=())(_forward)


@bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    _validate(x, bias, approximate)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastbert::extension_bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
                  need_dbias: bool) -> Tuple[Tensor, Tensor]:
    _validate(x, bias, approximate)
    common.check_like_x("bias_gelu backward", "grad_output", dy, x)
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    rows, cols = common.rows_cols(x)
    dbias = torch.zeros(cols if need_dbias else 0, dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        return dx, dbias
    b = common.f32(bias)
    code, mode = common.dtype_code(x.dtype), common.gelu_code(approximate)
    dbias_ptr = dbias.data_ptr() if need_dbias else 0
    if x.is_cuda:
        with torch.cuda.device(x.device):
            kernels, stream, sms = common.cuda_context(x)
            workspace = common.empty_f32(kernels.bias_gelu_bwd_workspace(rows, cols, sms) if need_dbias else 0, x)
            kernels.bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), common.ptr(b), dx.data_ptr(), dbias_ptr,
                                  common.ptr(workspace), rows, cols, code, mode, sms, stream)
    else:
        common.loader.module().bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), common.ptr(b), dx.data_ptr(), dbias_ptr,
                                             rows, cols, code, mode, torch.get_num_threads())
    return dx, dbias


@bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate, need_dbias):
    _validate(x, bias, approximate)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, torch.empty(x.shape[-1] if need_dbias else 0, dtype=torch.float32, device=x.device)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = bias_gelu_bwd(dy, x, bias, ctx.approximate, need_dbias)
    return dx, (dbias.to(bias.dtype) if need_dbias else None), None


bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu_extension(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """GELU(x + bias) on the extension's kernels; differentiable. The op checks its inputs."""
    forward = _forward if common.may_skip_dispatcher(x, bias) else bias_gelu_fwd
    return forward(x.contiguous(), bias, approximate)


def bind_cpu(run, bias: Optional[Tensor], approximate: str):
    """The "cpp" binder (registry.Implementation.binder): x -> GELU(x + bias) on a fixed bias, for an inference
    plan (fastbert/models/plan.py) on CPU, without `run`'s per-call checks.

    The caller guarantees what `bias_gelu_extension` would check per call: x is 2-D (rows, width of
    bias), contiguous, of a dtype the kernel takes, no autograd; rows > 0."""
    held = common.f32(bias)
    b_ptr, code = common.ptr(held), common.gelu_code(approximate)
    kernel, empty_like, threads = common.loader.module().bias_gelu_fwd, torch.empty_like, torch.get_num_threads
    dtype_codes = common.dtype_codes()

    def bias_gelu_rows(x: Tensor) -> Tensor:
        y = empty_like(x)
        kernel(x.data_ptr(), b_ptr, y.data_ptr(), x.shape[0], x.shape[1], dtype_codes[x.dtype], code, threads())
        return y

    bias_gelu_rows.parameters = held
    return bias_gelu_rows
