"""add_layer_norm on the extension's kernels (backends "cpp" and "cuda").

Ops: extension_add_layer_norm_fwd(x, residual?, weight, bias?, x_bias?, eps, dropout_p, seed?) -> (y, mean, rstd)
     extension_add_layer_norm_bwd(dy, x, residual?, weight, x_bias?, mean, rstd, dropout_p, seed?, need_dbias)
         -> (dx, dresidual | empty, dweight fp32, dbias fp32 | empty, dx_bias fp32 | empty)
dresidual is computed only with dropout; without it dresidual == dx and the autograd formula returns
dx for both, as PyTorch's own add does: one write pass less. The dropout mask is a hash of (seed,
element index), the seed a CPU tensor from fastbert.kernels.host.draw_seed; the backward regenerates it.
"""
# No `from __future__ import annotations` here: torch.library infers the op schemas from real types.
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert.kernels.host import draw_seed, seed_value
from fastbert.ops.extension import _common as common

OP = "add_layer_norm"


def _validate(x, residual, weight, bias, x_bias, eps, dropout_p) -> None:
    common.check_input(OP, x)
    common.check_same_device(OP, x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    common.check_like_x(OP, "residual", residual, x)
    if weight is None:
        raise ValueError(f"{OP}: weight is required")
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        common.check_vector(OP, name, t, x.shape[-1])
    if not eps >= 0.0:  # 0 is allowed: one public ELECTRA checkpoint has layer_norm_eps=0.0
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")
    common.check_dropout(OP, dropout_p)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _separate_dres(residual: Optional[Tensor], dropout_p: float) -> bool:
    """Whether the backward writes dresidual apart from dx (only when dropout makes them differ)."""
    return residual is not None and dropout_p > 0.0


def _forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                       x_bias: Optional[Tensor], eps: float, dropout_p: float,
                       seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    _validate(x, residual, weight, bias, x_bias, eps, dropout_p)
    x, residual = x.contiguous(), _contiguous(residual)
    rows, cols = common.rows_cols(x)
    y = torch.empty_like(x)
    mean, rstd = common.empty_f32(rows, x), common.empty_f32(rows, x)
    if rows == 0 or cols == 0:
        return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    w, b, xb = common.f32(weight), common.f32(bias), common.f32(x_bias)
    args = (x.data_ptr(), common.ptr(residual), w.data_ptr(), common.ptr(b), common.ptr(xb), y.data_ptr(),
            mean.data_ptr(), rstd.data_ptr(), rows, cols, common.dtype_code(x.dtype), float(eps), float(dropout_p),
            seed_value(seed))
    if x.is_cuda:
        with torch.cuda.device(x.device):
            kernels, stream, _ = common.cuda_context(x)
            kernels.add_layer_norm_fwd(*args, stream)
    else:
        common.loader.module().add_layer_norm_fwd(*args, torch.get_num_threads())
    return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


add_layer_norm_fwd = torch.library.custom_op("fastbert::extension_add_layer_norm_fwd", mutates_args=())(_forward)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, x_bias, eps, dropout_p, seed):
    _validate(x, residual, weight, bias, x_bias, eps, dropout_p)
    stats = x.shape[:-1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(stats, dtype=torch.float32, device=x.device),
            torch.empty(stats, dtype=torch.float32, device=x.device))


def _gradient_buffers(x: Tensor, residual: Optional[Tensor], x_bias: Optional[Tensor], dropout_p: float,
                      need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual | empty, dweight, dbias | empty, dx_bias | empty), vectors zeroed fp32."""
    cols = x.shape[-1]

    def vector(wanted: bool) -> Tensor:
        return torch.zeros(cols if wanted else 0, dtype=torch.float32, device=x.device)

    def like_x() -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    dres = like_x() if _separate_dres(residual, dropout_p) else x.new_empty(0)
    return like_x(), dres, vector(True), vector(need_dbias), vector(x_bias is not None)


@torch.library.custom_op("fastbert::extension_add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor, x_bias: Optional[Tensor],
                       mean: Tensor, rstd: Tensor, dropout_p: float, seed: Optional[Tensor],
                       need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _validate(x, residual, weight, None, x_bias, 1.0, dropout_p)
    common.check_like_x("add_layer_norm backward", "grad_output", dy, x)
    dy, x, residual = dy.contiguous(), x.contiguous(), _contiguous(residual)
    rows, cols = common.rows_cols(x)
    dx, dres, dweight, dbias, dxb = _gradient_buffers(x, residual, x_bias, dropout_p, need_dbias)
    if rows == 0 or cols == 0:
        return dx, dres, dweight, dbias, dxb
    w, xb = common.f32(weight), common.f32(x_bias)
    mean, rstd = mean.to(torch.float32).contiguous(), rstd.to(torch.float32).contiguous()
    args = (dy.data_ptr(), x.data_ptr(), common.ptr(residual), w.data_ptr(), common.ptr(xb), mean.data_ptr(),
            rstd.data_ptr(), dx.data_ptr(), dres.data_ptr() if dres.numel() else 0, dweight.data_ptr(),
            dbias.data_ptr() if need_dbias else 0, dxb.data_ptr() if xb is not None else 0)
    tail = (rows, cols, common.dtype_code(x.dtype), float(dropout_p), seed_value(seed))
    if x.is_cuda:
        with torch.cuda.device(x.device):
            kernels, stream, sms = common.cuda_context(x)
            workspace = common.empty_f32(kernels.add_layer_norm_bwd_workspace(rows, cols, sms), x)
            kernels.add_layer_norm_bwd(*args, workspace.data_ptr(), *tail, sms, stream)
    else:
        common.loader.module().add_layer_norm_bwd(*args, *tail, torch.get_num_threads())
    return dx, dres, dweight, dbias, dxb


@add_layer_norm_bwd.register_fake
def _(dy, x, residual, weight, x_bias, mean, rstd, dropout_p, seed, need_dbias):
    _validate(x, residual, weight, None, x_bias, 1.0, dropout_p)
    dx, dres, dweight, dbias, dxb = _gradient_buffers(x, residual, x_bias, dropout_p, need_dbias)
    return dx, dres, dweight, dbias, dxb


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, x_bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, x_bias, mean, rstd, seed)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.dropout_p = dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, x_bias, mean, rstd, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    need_dbias = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
    dx, dres, dweight, dbias, dxb = add_layer_norm_bwd(
        dy, x, residual, weight, x_bias, mean, rstd, ctx.dropout_p, seed, need_dbias)
    if residual is None:
        dres = None
    elif not _separate_dres(residual, ctx.dropout_p):
        dres = dx  # d(h)/d(residual) = d(h)/d(x) without dropout
    return (dx,
            dres,
            dweight.to(weight.dtype),
            dbias.to(ctx.bias_dtype) if need_dbias else None,
            dxb.to(x_bias.dtype) if x_bias is not None else None,
            None, None, None)


add_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def add_layer_norm_extension(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                             eps: float, *, x_bias: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) on the extension's kernels; differentiable w.r.t. every
    tensor. The op checks its inputs."""
    seed = draw_seed() if dropout_p > 0.0 else None
    forward = _forward if common.may_skip_dispatcher(x, residual, weight, bias, x_bias) else add_layer_norm_fwd
    y, _, _ = forward(x.contiguous(), _contiguous(residual), weight, bias, x_bias, float(eps), float(dropout_p), seed)
    return y


def bind_cpu(run, weight: Tensor, bias: Optional[Tensor], eps: float, x_bias: Optional[Tensor] = None):
    """The "cpp" binder (registry.Implementation.binder): (x, residual) -> LayerNorm(x + x_bias + residual) on
    fixed parameters, for an inference plan (fastbert/models/plan.py) on CPU: the parameters are converted and
    their addresses read once, here; the kernel is called without `run`'s per-call checks.

    The caller guarantees what `add_layer_norm_extension` would check per call: x and residual are
    2-D (rows, width of weight), contiguous, of one dtype the kernel takes, no autograd, no dropout;
    rows > 0. The plan holds the parameters and rebuilds itself when any of them changes.
    """
    width = weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        common.check_vector(OP, name, t, width)
    held = tuple(common.f32(t) for t in (weight, bias, x_bias))  # kept alive by the closure
    w_ptr, b_ptr, xb_ptr = (common.ptr(t) for t in held)
    kernel, eps = common.loader.module().add_layer_norm_fwd, float(eps)
    empty, empty_like, threads = torch.empty, torch.empty_like, torch.get_num_threads

    def add_layer_norm_rows(x: Tensor, residual: Tensor) -> Tensor:
        rows = x.shape[0]
        y, stats = empty_like(x), empty(2 * rows)  # mean and rstd: written, not needed without backward
        mean = stats.data_ptr()
        kernel(x.data_ptr(), residual.data_ptr(), w_ptr, b_ptr, xb_ptr, y.data_ptr(), mean, mean + 4 * rows,
               rows, width, dtype_codes[x.dtype], eps, 0.0, 0, threads())
        return y

    dtype_codes = common.dtype_codes()
    add_layer_norm_rows.parameters = held
    return add_layer_norm_rows
