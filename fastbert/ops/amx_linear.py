"""bf16 GEMMs for few rows on AMX (csrc/cpu/amx_linear.cpp): y = activation(x @ weight.T + bias).

Why: up to a few hundred rows (one short request, a small batch) a GEMM takes the time it needs to
stream its weight, and on an AMX Xeon this kernel streams it about twice as fast as oneDNN's packed bf16
GEMM behind torch's ops (docs/perf-notes.md, "AMX GEMM for few rows"). Above MAX_ROWS oneDNN is as fast
or faster, so `by_rows` sends larger calls there.

Where it runs: bf16 CPU inference (it has no backward) on a CPU with AMX-BF16 whose OS grants the tile
state, for weights with out_features % 16 == 0 and in_features % 32 == 0 (every BERT-family width), with
the extension built; `problem(weight)` says why not. The inference plan and oneDNN's packed linear
(fastbert.ops.onednn_linear) call it; nothing else does.

Packed weights: one bf16 copy of each weight it runs, in AMX's tile layout, made on first use and cached
like oneDNN's (fastbert.ops.weight_cache; `cache_bytes()`). FASTBERT_PACKED_WEIGHTS=0 (or
onednn_linear.set_packing(False)) turns packing, and so this kernel, off; FASTBERT_AMX=0 turns off only
this kernel.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from fastbert.ops.weight_cache import PackedWeights

MAX_ROWS = 256  # above this, oneDNN's GEMM is as fast (bert-base shapes) or faster (docs/perf-notes.md)
ACTIVATIONS = (None, "gelu", "gelu_tanh", "tanh")

_enabled = os.environ.get("FASTBERT_AMX", "1").strip().lower() not in ("0", "false", "off")
_cache = PackedWeights()
_usable: bool | None = None  # the CPU and OS check, made once


def _kernels():
    from fastbert import extension

    return extension.module()


def _machine_problem() -> str | None:
    global _usable
    from fastbert.ops import onednn_linear

    if not _enabled:
        return "the AMX GEMM is switched off (FASTBERT_AMX=0)"
    if not onednn_linear.packing_enabled():
        return "packed weights are switched off (FASTBERT_PACKED_WEIGHTS=0 or onednn_linear.set_packing(False))"
    kernels = _kernels()
    if kernels is None or not hasattr(kernels, "amx_bf16_linear"):
        return "the fastbert._C extension with the AMX GEMM is not built"
    if _usable is None:
        _usable = bool(kernels.amx_bf16_usable())
    return None if _usable else "this CPU has no AMX-BF16, or the OS does not grant its tile state"


def problem(weight: torch.Tensor) -> str | None:
    """Why the AMX GEMM cannot run `weight` (out_features, in_features); None if it can."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return f"the AMX GEMM takes a 2-D CPU weight, got shape {tuple(weight.shape)} on {weight.device}"
    out_features, in_features = weight.shape
    if out_features % 16 or in_features % 32:
        return (f"the AMX GEMM needs out_features % 16 == 0 and in_features % 32 == 0, got {out_features} and "
                f"{in_features}")
    return _machine_problem()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight in bf16, packed into AMX tiles (cached while the weight is the same tensor, unchanged)."""
    return _cache.get(weight, torch.bfloat16, _pack)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    source = weight.to(torch.bfloat16).contiguous()
    packed = torch.empty(source.numel(), dtype=torch.bfloat16)
    _kernels().amx_bf16_pack(source.data_ptr(), packed.data_ptr(), *source.shape)
    return packed


def clear_cache() -> None:
    _cache.clear()


def cache_bytes() -> int:
    return _cache.nbytes()


def _activation_code(kernels, activation: str | None) -> int:
    codes = {None: kernels.ACTIVATION_NONE, "gelu": kernels.GELU_ERF, "gelu_tanh": kernels.GELU_TANH,
             "tanh": kernels.ACTIVATION_TANH}
    if activation not in codes:
        raise ValueError(f"amx_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return codes[activation]


def amx_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
               out_features: int) -> torch.Tensor:
    """activation(x @ W.T + bias) for a bf16 CPU x (..., in_features) and W packed by `packed_weight`;
    bias fp32 (out_features,) or None. Inference only."""
    in_features = x.shape[-1]
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"amx_linear: x must be a bf16 CPU tensor, got {x.dtype} on {x.device}")
    if packed.numel() != out_features * in_features:
        raise ValueError(f"amx_linear: the packed weight holds {packed.numel()} elements, x's in_features "
                         f"{in_features} x out_features {out_features} need {out_features * in_features}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
        raise ValueError(f"amx_linear: bias must be fp32 of shape ({out_features},), got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    rows = x.reshape(-1, in_features).contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    kernels = _kernels()
    kernels.amx_bf16_linear(rows.data_ptr(), packed.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                            rows.shape[0], out_features, in_features, _activation_code(kernels, activation),
                            torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


def amx_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   activation: str | None) -> torch.Tensor:
    """The reference: the same products in fp32 (bf16 x bf16 is exact there), then the bias and the
    activation, rounded to bf16 once at the end."""
    y = F.linear(x.float(), weight.to(torch.bfloat16).float(), None if bias is None else bias.float())
    if activation == "tanh":
        y = torch.tanh(y)
    elif activation is not None:
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y.to(torch.bfloat16)


def by_rows(weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
            large: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> activation(x @ weight.T + bias): on AMX for calls of at most MAX_ROWS rows, `large(x)` for
    more rows; just `large` where the AMX GEMM cannot run this weight. The inference plan binds this."""
    if problem(weight) is not None:
        return large
    packed, out_features, in_features = packed_weight(weight), weight.shape[0], weight.shape[1]
    bias = None if bias is None else bias.float()

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.numel() > MAX_ROWS * in_features:
            return large(x)
        return amx_linear(x, packed, bias, activation, out_features)

    return run
