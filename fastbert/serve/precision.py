"""--dtype auto: bf16 only where this CPU runs it natively and the model keeps its answers in it, else fp32."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastbert.cpu.machine import choice
from fastbert.cpu.onednn_linear import bf16_problem

BF16_MIN_COSINE = 0.9999  # mean cosine of bf16 to fp32 outputs on the calibration texts


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # fp32, bf16 or int8
    reason: str
    bf16_cosine: float | None = None  # measured only when the CPU qualified for bf16

    def describe(self) -> str:
        cosine = "" if self.bf16_cosine is None else f", bf16 cosine to fp32 {self.bf16_cosine:.6f}"
        return f"dtype {self.dtype} ({self.reason}{cosine})"


def choose_dtype(requested: str, bf16_cosine: Callable[[], float]) -> DtypeChoice:
    """The dtype to serve; `bf16_cosine` (costly: a second forward in bf16) is called only for an auto
    choice on a CPU with native bf16 that oneDNN can use."""
    if requested != "auto":
        return DtypeChoice(requested, f"--dtype {requested}")
    native = choice("serve_bf16")
    if not native:  # bf16 emulated on AVX2 is slower than fp32
        return DtypeChoice("fp32", "auto: this CPU has no native bf16 (AMX-BF16 or AVX512-BF16)")
    problem = bf16_problem()
    if problem is not None:
        return DtypeChoice("fp32", f"auto: {problem}")
    cosine = bf16_cosine()
    if cosine < BF16_MIN_COSINE:
        return DtypeChoice("fp32", f"auto: bf16 changes this model's outputs (cosine < {BF16_MIN_COSINE})", cosine)
    return DtypeChoice("bf16", f"auto: native bf16 ({', '.join(native)}), outputs kept", cosine)
