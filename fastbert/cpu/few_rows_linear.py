"""CPU GEMMs for few rows: y = activation(x @ weight.T + bias), bf16 on AMX or AVX512-BF16, fp32 on AVX-512.

Why: up to a few hundred rows (one short request, a small batch) a GEMM takes the time it needs to stream
its weight, and oneDNN's packed GEMM behind torch's ops streams it at about half the rate these kernels
do (csrc/cpu/gemm/amx_bf16.cpp, csrc/cpu/gemm/avx512_bf16.cpp, csrc/cpu/gemm/avx512_fp32.cpp; docs/perf-notes.md,
"GEMMs for few rows"). Above a kernel's row limit (`max_rows`: measured per kernel and epilogue) oneDNN is as
fast or faster, so `by_rows` sends larger calls there.

Where they run: CPU inference (no backward); bf16 on a CPU with AMX-BF16 whose OS grants the tile state,
else on one with AVX512-BF16 (both: out_features % 16 == 0, in_features % 32 == 0; one packed layout), fp32
on a CPU with AVX-512 (out_features % 16 == 0); every BERT-family width qualifies; the extension must be
built. `problem(weight)` says why not. The inference plan and oneDNN's packed linear
(fastbert.cpu.onednn_linear) call them; nothing else does.

Packed weights: one copy of each weight they run, in the kernel's layout, made on first use and cached
like oneDNN's (fastbert.cpu.weight_cache; `cache_bytes()`). FASTBERT_PACKED_WEIGHTS=0 (or
onednn_linear.set_packing(False)) turns packing, and so these kernels, off; FASTBERT_FEW_ROWS_GEMM=0
turns off only these kernels.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from fastbert import extension
from fastbert.cpu.weight_cache import PackedWeights, packing_enabled
from fastbert.env import flag

MAX_ROWS = 256  # the most rows any kernel here takes (docs/perf-notes.md)
ACTIVATIONS = (None, "gelu", "gelu_tanh", "tanh")

_enabled = flag("FASTBERT_FEW_ROWS_GEMM", default=True)
_cache = PackedWeights()


class _Kernel(NamedTuple):
    name: str  # what `fastbert info` calls it
    check: str  # its row of the machine record's fastbert._C checks (machine.EXTENSION_CHECKS)
    pack: str
    linear: str
    k_multiple: int  # in_features must be a multiple of this
    needs: str  # what the CPU must have, for messages
    max_rows: int  # above this many rows oneDNN's GEMM is as fast (measured: docs/perf-notes.md)
    max_rows_gelu: int  # the same with a GELU epilogue


# Per dtype, the kernels in order of preference: the first one this CPU runs is used.
_KERNELS = {
    torch.bfloat16: (
        # AMX: oneDNN's GELU epilogue costs about half of this kernel's, which decides from ~32 rows
        _Kernel("AMX", "amx_bf16_gemm", "bf16_pack", "amx_bf16_linear", 32,
                "AMX-BF16 (and an OS that grants its tile state)", MAX_ROWS, 32),
        # AVX512-BF16 (AMD Zen 4/5): the GELU epilogue makes oneDNN as fast from ~64 rows
        _Kernel("AVX512-BF16", "avx512_bf16_gemm", "bf16_pack", "avx512_bf16_linear", 32, "AVX512-BF16", MAX_ROWS,
                64),
    ),
    torch.float32: (
        _Kernel("AVX-512", "avx512_fp32_gemm", "avx512_fp32_pack", "avx512_fp32_linear", 1, "AVX-512", MAX_ROWS,
                MAX_ROWS),
    ),
}
_chosen: dict[torch.dtype, _Kernel | None] = {}  # per dtype, from the machine record, once


def _module():
    """fastbert._C or None: the loader's one cached answer (a build without it runs oneDNN's GEMMs)."""
    return extension.cpu_module()


def _kernel(dtype: torch.dtype) -> _Kernel | None:
    """The first of dtype's kernels that this CPU runs, or None (also without the extension or its kernels)."""
    if dtype not in _chosen:
        from fastbert.cpu.machine import machine

        module, record = _module(), machine()

        def runs(kernel: _Kernel) -> bool:
            return hasattr(module, kernel.linear) and record.runs(kernel.check)

        _chosen[dtype] = next((kernel for kernel in _KERNELS[dtype] if module is not None and runs(kernel)), None)
    return _chosen[dtype]


def _machine_problem(dtype: torch.dtype) -> str | None:
    if not _enabled:
        return "the few-rows GEMMs are switched off (FASTBERT_FEW_ROWS_GEMM=0)"
    if not packing_enabled():
        return "packed weights are switched off (FASTBERT_PACKED_WEIGHTS=0 or onednn_linear.set_packing(False))"
    module = _module()
    if module is None:
        return extension.load_problem()
    if not all(hasattr(module, kernel.linear) for kernel in _KERNELS[dtype]):
        return "fastbert._C predates the few-rows GEMMs (rebuild the extension)"
    if _kernel(dtype) is None:
        return "this CPU has no " + " and no ".join(kernel.needs for kernel in _KERNELS[dtype])
    return None


def kernel_name(dtype: torch.dtype) -> str | None:
    """What runs dtype's few-rows GEMMs here (e.g. "AVX512-BF16"), None where none can (`problem` says why)."""
    return None if problem(torch.empty(16, 32, dtype=dtype)) is not None else _kernel(dtype).name


def problem(weight: torch.Tensor, dtype: torch.dtype | None = None) -> str | None:
    """Why the few-rows GEMM cannot run `weight` (out_features, in_features) in `dtype` (default: the
    weight's own); None if it can."""
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in _KERNELS:
        return f"the few-rows GEMMs run bf16 or fp32, got {dtype}"
    if weight.device.type != "cpu" or weight.dim() != 2:
        return f"the few-rows GEMMs take a 2-D CPU weight, got shape {tuple(weight.shape)} on {weight.device}"
    out_features, in_features = weight.shape
    multiple = max(kernel.k_multiple for kernel in _KERNELS[dtype])
    if out_features % 16 or in_features % multiple:
        return (f"the {dtype} few-rows GEMM needs out_features % 16 == 0 and in_features % {multiple} == 0, got "
                f"{out_features} and {in_features}")
    return _machine_problem(dtype)


def packed_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight in `dtype` (default its own), packed for the few-rows kernel (cached while the weight is the
    same tensor, unchanged)."""
    dtype = weight.dtype if dtype is None else dtype
    return _cache.get(weight, dtype, lambda w: _pack(w, dtype))


def _pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    source = weight.to(dtype).contiguous()
    packed = torch.empty(source.numel(), dtype=dtype)
    getattr(_module(), _kernel(dtype).pack)(source.data_ptr(), packed.data_ptr(), *source.shape)
    return packed


def clear_cache() -> None:
    _cache.clear()


def cache_bytes() -> int:
    return _cache.nbytes()


def _activation_code(module, activation: str | None) -> int:
    codes = {None: module.ACTIVATION_NONE, "gelu": module.GELU_ERF, "gelu_tanh": module.GELU_TANH,
             "tanh": module.ACTIVATION_TANH}
    if activation not in codes:
        raise ValueError(f"few_rows_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return codes[activation]


def few_rows_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                    out_features: int) -> torch.Tensor:
    """activation(x @ W.T + bias) for a bf16 or fp32 CPU x (..., in_features) and W packed in x's dtype by
    `packed_weight`; bias fp32 (out_features,) or None. Inference only."""
    in_features = x.shape[-1]
    if x.dtype not in _KERNELS or x.device.type != "cpu" or packed.dtype != x.dtype:
        raise ValueError(f"few_rows_linear: x must be a bf16 or fp32 CPU tensor in the packed weight's dtype "
                         f"{packed.dtype}, got {x.dtype} on {x.device}")
    if packed.numel() != out_features * in_features:
        raise ValueError(f"few_rows_linear: the packed weight holds {packed.numel()} elements, x's in_features "
                         f"{in_features} x out_features {out_features} need {out_features * in_features}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
        raise ValueError(f"few_rows_linear: bias must be fp32 of shape ({out_features},), got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    module = _module()
    addresses = (packed.data_ptr(), 0 if bias is None else bias.data_ptr())
    return _launch(getattr(module, _kernel(x.dtype).linear), _activation_code(module, activation), x, addresses,
                   out_features)


def _launch(kernel, code: int, x: torch.Tensor, addresses: tuple[int, int], out_features: int) -> torch.Tensor:
    """The kernel call on x's rows, checks done: addresses are the packed weight's and the bias's (0: none)."""
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features).contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=x.dtype)
    kernel(rows.data_ptr(), *addresses, y.data_ptr(), rows.shape[0], out_features, in_features, code,
           torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


def few_rows_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        activation: str | None) -> torch.Tensor:
    """The reference: the products in fp32 (bf16 x bf16 is exact there), then the bias and the activation,
    rounded to x's dtype once at the end."""
    y = F.linear(x.float(), weight.to(x.dtype).float(), None if bias is None else bias.float())
    if activation == "tanh":
        y = torch.tanh(y)
    elif activation is not None:
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y.to(x.dtype)


def max_rows(dtype: torch.dtype, activation: str | None) -> int:
    """The most rows a call may have to run on dtype's few-rows kernel here (measured; docs/perf-notes.md);
    0 where this CPU runs none. Cheap (a dict lookup): linear_onednn asks on every call, before `problem`."""
    kernel = _kernel(dtype) if dtype in _KERNELS else None
    if kernel is None:
        return 0
    return kernel.max_rows_gelu if activation in ("gelu", "gelu_tanh") else kernel.max_rows


def by_rows(weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
            large: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> activation(x @ weight.T + bias) in the weight's dtype: the few-rows kernel for calls of at most
    max_rows(...) rows, `large(x)` for more; just `large` where the kernel cannot run this weight. The inference
    plan binds this: what `few_rows_linear` checks per call is checked here once (x must have the weight's
    dtype and device: the plan's activations do)."""
    if problem(weight) is not None:
        return large
    out_features, in_features, dtype = weight.shape[0], weight.shape[1], weight.dtype
    module = _module()
    kernel, code = getattr(module, _kernel(dtype).linear), _activation_code(module, activation)
    packed, bias = packed_weight(weight), None if bias is None else bias.float().contiguous()
    addresses = (packed.data_ptr(), 0 if bias is None else bias.data_ptr())
    most = max_rows(dtype, activation) * in_features

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.numel() > most or x.dtype != dtype:
            return large(x)
        return _launch(kernel, code, x, addresses, out_features)

    run.packed, run.bias = packed, bias  # keeps alive what `addresses` point into
    return run
