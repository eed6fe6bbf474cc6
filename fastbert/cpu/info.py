"""What this CPU is and which of the features that decide fastbert's CPU kernels it has (Linux: /proc/cpuinfo).
Read by `fastbert info`, benchmark records and the int8 path (fastbert.cpu.int8_linear)."""
from __future__ import annotations

import functools
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide which kernels are fast (AMX: bf16/int8 GEMMs; AVX-512 BF16/VNNI: bf16/int8
# dot products); results taken on different CPUs are not comparable (docs/perf-notes.md).
CPU_FEATURES = ("avx2", "avx_vnni", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_features() -> list[str]:
    """Which of CPU_FEATURES /proc/cpuinfo lists (Linux); an empty list where it cannot be read."""
    return list(_read_features())


@functools.lru_cache(maxsize=None)
def _read_features() -> tuple[str, ...]:
    """Read once per process: the backend order, the plans' attention and the int8 path all ask."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return tuple(name for name in CPU_FEATURES if name in flags)
    except OSError:
        pass
    return ()
