"""The compiled kernels of fastbert._C (CPU) and fastbert._C_cuda (CUDA) as torch.library custom ops.

The kernel library in csrc/ does not link libtorch (see csrc/README.md): it takes raw pointers,
sizes and dtype codes. This module is the only place that talks to it, and it does everything
torch-specific: validation (with clear errors, before any pointer reaches C++), making inputs
contiguous, allocating outputs, streams, the dropout seed (drawn from torch's default generator),
autograd (register_autograd) and fake implementations (register_fake) so that torch.compile traces
the ops without graph breaks.

Ops (namespace "fastbert"):
  bias_gelu_fwd(x, bias?, approximate) -> y
  bias_gelu_bwd(dy, x, bias?, approximate, need_dbias) -> (dx, dbias fp32 | empty)
  add_layer_norm_fwd(x, residual?, weight, bias?, x_bias?, eps, dropout_p, seed) -> (y, mean, rstd)
  add_layer_norm_bwd(dy, x, residual?, weight, x_bias?, mean, rstd, dropout_p, seed, need_dbias)
      -> (dx, dresidual | empty, dweight fp32, dbias fp32 | empty, dx_bias fp32 | empty)
      (dresidual is computed only with dropout; without it dresidual == dx and the autograd formula
      returns dx for both, as PyTorch's own add does: one write pass less)
The entry points used by the dispatch are bias_gelu_compiled and add_layer_norm_compiled.
"""
# No `from __future__ import annotations` here: torch.library infers the op schemas from real types.
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert import extension

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}
_GELU_CODES = {"none": 0, "tanh": 1}
MAX_CUDA_LAYER_NORM_WIDTH = 8192  # csrc/include/fastbert_kernels.h kMaxLayerNormCols


# ----------------------------------------------------------------------------------------------
# validation (shared by the real and the fake implementations)

def _check_activation(op: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.device.type not in _DTYPES:
        raise ValueError(f"{op}: the compiled kernels run on CPU or CUDA tensors, got a {x.device.type} tensor")
    if x.dtype not in _DTYPES[x.device.type]:
        allowed = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[x.device.type])
        raise TypeError(f"{op}: {x.device.type} kernels take {allowed} inputs, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension")


def _check_same_device(op: str, x: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_vector(op: str, name: str, t: Optional[Tensor], width: int) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != width:
        raise ValueError(f"{op}: {name} must have shape ({width},) (the last dim of x), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_like_x(op: str, name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")


def _validate_bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str) -> None:
    op = "bias_gelu"
    _check_activation(op, x)
    _check_same_device(op, x, bias=bias)
    _check_vector(op, "bias", bias, x.shape[-1])
    if approximate not in _GELU_CODES:
        raise ValueError(f"{op}: approximate must be one of {tuple(_GELU_CODES)}, got {approximate!r}")


def _validate_add_layer_norm(x, residual, weight, bias, x_bias, eps, dropout_p) -> None:
    op = "add_layer_norm"
    _check_activation(op, x)
    _check_same_device(op, x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    _check_like_x(op, "residual", residual, x)
    width = x.shape[-1]
    if weight is None:
        raise ValueError(f"{op}: weight is required")
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        _check_vector(op, name, t, width)
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if x.device.type == "cuda" and width > MAX_CUDA_LAYER_NORM_WIDTH:
        raise ValueError(f"{op}: the CUDA kernel handles widths up to {MAX_CUDA_LAYER_NORM_WIDTH}, got {width}")


# ----------------------------------------------------------------------------------------------
# helpers

def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """Parameter vectors go to the kernels as contiguous float32."""
    return None if t is None else t.to(torch.float32).contiguous()


def _rows_cols(x: Tensor) -> Tuple[int, int]:
    cols = x.shape[-1]
    return (x.numel() // cols if cols else 0), cols


def _cuda_context(x: Tensor):
    """(module, stream as int, SM count) for a CUDA tensor."""
    stream = torch.cuda.current_stream(x.device).cuda_stream
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return extension.cuda_module(), stream, sms


def _empty(n: int, like: Tensor) -> Tensor:
    return torch.empty(n, dtype=torch.float32, device=like.device)


# ----------------------------------------------------------------------------------------------
# bias_gelu

@torch.library.custom_op("fastbert::ext_bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    _validate_bias_gelu(x, bias, approximate)
    x = x.contiguous()
    y = torch.empty_like(x)
    rows, cols = _rows_cols(x)
    if rows == 0 or cols == 0:
        return y
    b = _f32(bias)
    code, mode = _DTYPE_CODES[x.dtype], _GELU_CODES[approximate]
    if x.is_cuda:
        with torch.cuda.device(x.device):
            mod, stream, _ = _cuda_context(x)
            mod.bias_gelu_fwd(x.data_ptr(), _ptr(b), y.data_ptr(), rows, cols, code, mode, stream)
    else:
        extension.module().bias_gelu_fwd(x.data_ptr(), _ptr(b), y.data_ptr(), rows, cols, code, mode,
                                         torch.get_num_threads())
    return y


@bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    _validate_bias_gelu(x, bias, approximate)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastbert::ext_bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
                  need_dbias: bool) -> Tuple[Tensor, Tensor]:
    _validate_bias_gelu(x, bias, approximate)
    _check_like_x("bias_gelu backward", "grad_output", dy, x)
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    rows, cols = _rows_cols(x)
    dbias = torch.zeros(cols if need_dbias else 0, dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        return dx, dbias
    b = _f32(bias)
    code, mode = _DTYPE_CODES[x.dtype], _GELU_CODES[approximate]
    dbias_ptr = dbias.data_ptr() if need_dbias else 0
    if x.is_cuda:
        with torch.cuda.device(x.device):
            mod, stream, sms = _cuda_context(x)
            workspace = _empty(mod.bias_gelu_bwd_workspace(rows, cols, sms) if need_dbias else 0, x)
            mod.bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), _ptr(b), dx.data_ptr(), dbias_ptr, _ptr(workspace),
                              rows, cols, code, mode, sms, stream)
    else:
        extension.module().bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), _ptr(b), dx.data_ptr(), dbias_ptr, rows, cols,
                                         code, mode, torch.get_num_threads())
    return dx, dbias


@bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate, need_dbias):
    _validate_bias_gelu(x, bias, approximate)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, torch.empty(x.shape[-1] if need_dbias else 0, dtype=torch.float32, device=x.device)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, dbias = torch.ops.fastbert.ext_bias_gelu_bwd(dy, x, bias, ctx.approximate, need_dbias)
    return dx, (dbias.to(bias.dtype) if need_dbias else None), None


bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


def bias_gelu_compiled(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """GELU(x + bias) on the compiled kernels (backends "cpp" and "cuda"); differentiable."""
    _validate_bias_gelu(x, bias, approximate)
    return torch.ops.fastbert.ext_bias_gelu_fwd(x.contiguous(), bias, approximate)


# ----------------------------------------------------------------------------------------------
# add_layer_norm

@torch.library.custom_op("fastbert::ext_add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                       x_bias: Optional[Tensor], eps: float, dropout_p: float,
                       seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    _validate_add_layer_norm(x, residual, weight, bias, x_bias, eps, dropout_p)
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    rows, cols = _rows_cols(x)
    y = torch.empty_like(x)
    mean = _empty(rows, x)
    rstd = _empty(rows, x)
    if rows == 0 or cols == 0:
        return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    w, b, xb = _f32(weight), _f32(bias), _f32(x_bias)
    args = (x.data_ptr(), _ptr(residual), w.data_ptr(), _ptr(b), _ptr(xb), y.data_ptr(), mean.data_ptr(),
            rstd.data_ptr(), rows, cols, _DTYPE_CODES[x.dtype], float(eps), float(dropout_p), int(seed))
    if x.is_cuda:
        with torch.cuda.device(x.device):
            mod, stream, _ = _cuda_context(x)
            mod.add_layer_norm_fwd(*args, stream)
    else:
        extension.module().add_layer_norm_fwd(*args, torch.get_num_threads())
    return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, x_bias, eps, dropout_p, seed):
    _validate_add_layer_norm(x, residual, weight, bias, x_bias, eps, dropout_p)
    stats = x.shape[:-1]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(stats, dtype=torch.float32, device=x.device),
            torch.empty(stats, dtype=torch.float32, device=x.device))


def _separate_dres(residual: Optional[Tensor], dropout_p: float) -> bool:
    """Whether the backward writes dresidual apart from dx (only when dropout makes them differ)."""
    return residual is not None and dropout_p > 0.0


@torch.library.custom_op("fastbert::ext_add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor, x_bias: Optional[Tensor],
                       mean: Tensor, rstd: Tensor, dropout_p: float, seed: int,
                       need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _validate_add_layer_norm(x, residual, weight, None, x_bias, 1.0, dropout_p)
    _check_like_x("add_layer_norm backward", "grad_output", dy, x)
    dy, x = dy.contiguous(), x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    rows, cols = _rows_cols(x)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if _separate_dres(residual, dropout_p) else x.new_empty(0)
    dweight = torch.zeros(cols, dtype=torch.float32, device=x.device)
    dbias = torch.zeros(cols if need_dbias else 0, dtype=torch.float32, device=x.device)
    dxb = torch.zeros(cols if x_bias is not None else 0, dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        return dx, dres, dweight, dbias, dxb
    w, xb = _f32(weight), _f32(x_bias)
    mean, rstd = mean.to(torch.float32).contiguous(), rstd.to(torch.float32).contiguous()
    args = (dy.data_ptr(), x.data_ptr(), _ptr(residual), w.data_ptr(), _ptr(xb), mean.data_ptr(), rstd.data_ptr(),
            dx.data_ptr(), dres.data_ptr() if dres.numel() else 0, dweight.data_ptr(),
            dbias.data_ptr() if need_dbias else 0, _ptr(xb) and dxb.data_ptr())
    tail = (rows, cols, _DTYPE_CODES[x.dtype], float(dropout_p), int(seed))
    if x.is_cuda:
        with torch.cuda.device(x.device):
            mod, stream, sms = _cuda_context(x)
            workspace = _empty(mod.add_layer_norm_bwd_workspace(rows, cols, sms), x)
            mod.add_layer_norm_bwd(*args, workspace.data_ptr(), *tail, sms, stream)
    else:
        extension.module().add_layer_norm_bwd(*args, *tail, torch.get_num_threads())
    return dx, dres, dweight, dbias, dxb


@add_layer_norm_bwd.register_fake
def _(dy, x, residual, weight, x_bias, mean, rstd, dropout_p, seed, need_dbias):
    _validate_add_layer_norm(x, residual, weight, None, x_bias, 1.0, dropout_p)
    cols = x.shape[-1]
    vec = lambda n: torch.empty(n, dtype=torch.float32, device=x.device)  # noqa: E731
    dres = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if _separate_dres(residual, dropout_p)
            else x.new_empty(0))
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), dres, vec(cols),
            vec(cols if need_dbias else 0), vec(cols if x_bias is not None else 0))


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, x_bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, x_bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.dropout_p, ctx.seed = dropout_p, seed
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _add_layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, x_bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    need_dbias = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
    dx, dres, dweight, dbias, dxb = torch.ops.fastbert.ext_add_layer_norm_bwd(
        dy, x, residual, weight, x_bias, mean, rstd, ctx.dropout_p, ctx.seed, need_dbias)
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


add_layer_norm_fwd.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def draw_seed() -> int:
    """A dropout seed from torch's default generator (so torch.manual_seed makes masks reproducible)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def add_layer_norm_compiled(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                            eps: float, *, x_bias: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) on the compiled kernels; differentiable w.r.t. every tensor.

    The dropout mask is a hash of (seed, element index): the backward pass regenerates it from the seed.
    """
    _validate_add_layer_norm(x, residual, weight, bias, x_bias, eps, dropout_p)
    seed = draw_seed() if dropout_p > 0.0 else 0
    residual = residual.contiguous() if residual is not None else None
    y, _, _ = torch.ops.fastbert.ext_add_layer_norm_fwd(x.contiguous(), residual, weight, bias, x_bias, float(eps),
                                                    float(dropout_p), seed)
    return y
