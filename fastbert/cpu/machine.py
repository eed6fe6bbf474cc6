"""The one record of what this CPU can do, and the CPU-dependent choices made from it.

Every CPU fact fastbert's choices depend on comes from `machine()`: the features /proc/cpuinfo lists,
narrowed by what fastbert._C finds when it is built (its CPUID checks and Linux's grant of the AMX tile
state: a VM can list amx_bf16 and still refuse the tiles, and then neither fastbert's AMX GEMM nor
oneDNN's AMX kernels run). Read once per process, on first use (never at import: `import fastbert` loads
no extension), then frozen.

Each choice that depends on the CPU is a row of `CHOICES`: the rule, and the benchmark that decided it,
to re-run on a new kind of CPU (`fastbert info` prints the table). No choice is timed inside a serving
process.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from fastbert.cpu.info import cpu_features, cpu_name

# fastbert._C's own checks (CPUID, and for AMX the OS tile grant), by kernel
EXTENSION_CHECKS = {
    "amx_bf16_gemm": "amx_bf16_usable",
    "avx512_bf16_gemm": "avx512_bf16_usable",
    "avx512_fp32_gemm": "avx512_fp32_usable",
}


@dataclass(frozen=True)
class Machine:
    name: str  # the CPU model name
    features: frozenset[str]  # which of info.CPU_FEATURES /proc/cpuinfo lists
    kernels: dict[str, bool] | None  # EXTENSION_CHECKS' answers; None without fastbert._C
    source: str  # where the facts came from, for `fastbert info`

    def has(self, feature: str) -> bool:
        return feature in self.features

    @property
    def amx_tiles(self) -> bool:
        """AMX listed and usable: fastbert._C found the OS grant (without the extension, the listing decides)."""
        if not self.features & {"amx_bf16", "amx_int8"}:
            return False
        return True if self.kernels is None else self.kernels["amx_bf16_gemm"]

    @property
    def amx_bf16(self) -> bool:
        return self.has("amx_bf16") and self.amx_tiles

    @property
    def amx_int8(self) -> bool:
        return self.has("amx_int8") and self.amx_tiles

    @property
    def native_bf16(self) -> tuple[str, ...]:
        """The bf16 instructions this CPU runs natively ('' for none): AMX-BF16 (granted), AVX512-BF16."""
        return tuple(name for name, ok in (("amx_bf16", self.amx_bf16), ("avx512_bf16", self.has("avx512_bf16")))
                     if ok)

    @property
    def vnni(self) -> bool:
        """An int8 dot product that accumulates in 32 bits (AVX512-VNNI, AVX-VNNI or granted AMX-INT8)."""
        return self.has("avx512_vnni") or self.has("avx_vnni") or self.amx_int8

    def runs(self, kernel: str) -> bool:
        """Whether fastbert._C's `kernel` (a key of EXTENSION_CHECKS) runs here; False without the extension."""
        return bool(self.kernels and self.kernels.get(kernel))


def _extension_checks() -> dict[str, bool] | None:
    from fastbert import extension

    module = extension.cpu_module()
    if module is None:
        return None
    return {kernel: bool(hasattr(module, check) and getattr(module, check)())
            for kernel, check in EXTENSION_CHECKS.items()}


@functools.lru_cache(maxsize=None)
def machine() -> Machine:
    """This CPU's record (read once per process)."""
    kernels = _extension_checks()
    source = "/proc/cpuinfo" + (" and fastbert._C's CPUID/OS checks" if kernels is not None else " (no fastbert._C)")
    return Machine(cpu_name(), frozenset(cpu_features()), kernels, source)


# benchmarks/cpu_linear_order.py on the AVX2-only AMD EPYC (2 threads): oneDNN / F.linear 0.59-0.83 at 16 rows,
# 0.87-1.09 at 64, 0.95-1.11 at 128, 1.03-1.13 at 256 and above
AVX2_ONEDNN_FP32_MAX_ROWS = 64


def _short_seqlen() -> int:
    from fastbert.cpu.attention import SHORT_SEQLEN  # the lengths the kernel's 16/32-key score tiles cover

    return SHORT_SEQLEN


@dataclass(frozen=True)
class Choice:
    name: str
    rule: Callable[[Machine], object]  # machine -> the value
    says: str  # the rule in words
    benchmark: str  # what decided it: re-run on a new kind of CPU

    def value(self, record: Machine | None = None):
        return self.rule(record or machine())


CHOICES = {choice.name: choice for choice in (
    Choice("varlen_attention_order", lambda m: ("torch",) if m.amx_bf16 else ("cpp", "torch"),
           "padded CPU attention: torch's SDPA first with AMX (its GEMMs run on AMX), the cpp kernel first elsewhere",
           "benchmarks/cpu_varlen_attention_order.py"),
    Choice("fused_qkv_max_seqlen", lambda m: _short_seqlen() if m.amx_bf16 else math.inf,
           "the plans' attention on the fused QKV output: up to 32 tokens with AMX, every length elsewhere",
           "benchmarks/cpu_varlen_attention_order.py, then benchmarks/isolated_latency.py at 1 x 16..512"),
    Choice("int8_zero_point", lambda m: 0 if m.amx_int8 else 128,
           "int8 activations reach oneDNN as int8 on granted AMX-INT8, as uint8 + 128 elsewhere (oneDNN's "
           "s8 x s8 on VNNI is its reference loop)",
           "ONEDNN_VERBOSE=1 fastbert bench --dtype int8 (tests/cpu/test_int8_linear.py names the kernel)"),
    Choice("int8_gemm", lambda m: m.vnni,
           "oneDNN's int8 GEMM only with VNNI or AMX-INT8 (without, u8 x s8 pair sums saturate in 16 bits)",
           "tests/cpu/test_int8_linear.py's probe GEMM against the fp64 reference"),
    Choice("bf16_row_blocks", lambda m: m.amx_bf16,
           "bf16 GEMMs of >= 512 rows on 256-row blocks with AMX (oneDNN ran some shapes on one thread there)",
           "benchmarks/cpu_row_blocks.py"),
    Choice("onednn_fp32_max_rows", lambda m: math.inf if m.has("avx512f") else AVX2_ONEDNN_FP32_MAX_ROWS,
           "fp32 inference GEMMs of more rows run on torch's F.linear (MKL) on CPUs without AVX-512 (oneDNN's "
           "packed GEMM was faster there only for few rows); on oneDNN's packed GEMM at every row count elsewhere",
           "benchmarks/cpu_linear_order.py"),
    Choice("gelu_epilogue", lambda m: m.has("avx512f"),
           "the FFN-in GELU in oneDNN's epilogue with AVX-512; without it, fastbert's bias_gelu after the GEMM "
           "(oneDNN's GELU post-op cost more than the separate kernel there)",
           "benchmarks/cpu_linear_order.py"),
    Choice("serve_bf16", lambda m: m.native_bf16,
           "fastbert serve --dtype auto considers bf16 only with native bf16 (AMX-BF16 or AVX512-BF16)",
           "benchmarks/serve_load.py --dtype fp32 / bf16"),
)}


def choice(name: str):
    """The value of CHOICES[name] on this machine."""
    return _choice_value(name)


@functools.lru_cache(maxsize=None)
def _choice_value(name: str):
    return CHOICES[name].value()


class MachineChoice:
    """A value in a hand-kept table (the registry's auto order) that is a row of CHOICES: read on first use."""

    def __init__(self, name: str):
        CHOICES[name]  # a KeyError at import for a misspelled row
        self.name = name

    def __call__(self):
        return choice(self.name)

    def __repr__(self) -> str:
        return f"MachineChoice({self.name!r})"
