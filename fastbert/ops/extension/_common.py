"""What the extension's op modules share: input checks (run before any pointer reaches C++, by the real
and the fake implementations alike), the codes fastbert._C exports, pointers and CUDA launch context."""
# No `from __future__ import annotations`: the op modules' torch.library schemas come from real types.
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastbert import backend
from fastbert import extension as loader

_BACKEND_BY_DEVICE = {"cpu": "cpp", "cuda": "cuda"}


def check_input(op: str, x: Tensor) -> None:
    """x is a tensor that the registration of `op` on its device's extension backend takes."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension")
    backend_name = _BACKEND_BY_DEVICE.get(x.device.type)
    if backend_name is None:
        raise ValueError(f"{op}: the extension kernels run on CPU or CUDA tensors, got a {x.device.type} tensor")
    width = x.shape[-1]
    # Memo key; None under tracing, where the width can be symbolic (unhashable).
    accepted = (backend.REGISTRY.generation, op, x.device.type, x.dtype, width) if type(width) is int else None
    if accepted in _ACCEPTED:
        return
    call = backend.signature(op, x, width=width)
    problem = backend.REGISTRY.get(op, backend_name).problem(call)
    if problem is not None:
        raise ValueError(f"{op}: backend {backend_name!r} cannot take this call: {problem}")
    if accepted is not None:
        _ACCEPTED.add(accepted)


# (registry generation, op, device type, dtype, width) of calls the extension has taken: the check
# above runs on every call, and the answer depends on nothing else.
_ACCEPTED: set = set()


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def may_skip_dispatcher(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may run an op's Python body directly rather than through torch's dispatcher
    (same checks, same kernel, ~6 us less per call, which counts at batch 1): nothing records
    autograd, nothing traces (torch.compile, vmap/grad transforms, dispatch modes such as
    FakeTensorMode), and every tensor is a plain tensor (no subclass that must see the op)."""
    if backend.records_autograd(*tensors) or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack():
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def check_same_device(op: str, x: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_vector(op: str, name: str, t: Optional[Tensor], width: int) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != width:
        raise ValueError(f"{op}: {name} must have shape ({width},) (the last dim of x), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_like_x(op: str, name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")


def check_dropout(op: str, dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


@functools.lru_cache(maxsize=None)
def _codes() -> Tuple[dict, dict]:
    """(dtype codes, GELU codes) as fastbert._C exports them (csrc/include/fastbert_kernels.h)."""
    ext = loader.module()
    dtypes = {torch.float32: ext.FLOAT32, torch.float16: ext.FLOAT16, torch.bfloat16: ext.BFLOAT16}
    return dtypes, {"none": ext.GELU_ERF, "tanh": ext.GELU_TANH}


def dtype_code(dtype: torch.dtype) -> int:
    return _codes()[0][dtype]


def dtype_codes() -> dict:
    """dtype -> the code fastbert._C takes, for the dtypes its kernels run."""
    return _codes()[0]


def gelu_code(approximate: str) -> int:
    codes = _codes()[1]
    if approximate not in codes:
        raise ValueError(f"bias_gelu: approximate must be one of {tuple(codes)}, got {approximate!r}")
    return codes[approximate]


def ptr(t: Optional[Tensor]) -> int:
    """The address the kernels read, 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """Parameter vectors go to the kernels as contiguous float32 (usually they are: no op call then)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def rows_cols(x: Tensor) -> Tuple[int, int]:
    cols = x.shape[-1]
    return (x.numel() // cols if cols else 0), cols


def cuda_context(x: Tensor):
    """(module, stream as int, SM count) for a CUDA tensor."""
    stream = torch.cuda.current_stream(x.device).cuda_stream
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return loader.cuda_module(), stream, sms


def empty_f32(n: int, like: Tensor) -> Tensor:
    return torch.empty(n, dtype=torch.float32, device=like.device)
