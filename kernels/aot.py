"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, with no GPU.

`aot_compile` lowers one kernel configuration to a cubin with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", capability, 32))` and reports its resources. The compiled kernel only learns
n_regs / n_spills when loaded on a device, so the register and spill counts come from running ptxas -v
(the one triton ships) on the PTX triton produced, with the flags triton itself uses.

Each kernel module exposes `AOT_CASES`: a list of (name, fn, signature, constexprs, num_warps,
num_stages), one entry per configuration the launchers can pick. `python -m fastbert.kernels.aot`
prints a table of all of them.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CAPABILITIES = (80, 90)
# Usable shared memory per block (bytes): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# The modules that define AOT_CASES.
KERNEL_MODULES = ("fastbert.kernels.bias_gelu", "fastbert.kernels.add_layer_norm", "fastbert.kernels.attention",
                  "fastbert.kernels.geglu", "fastbert.kernels.rotary", "fastbert.kernels.window_attention",
                  "fastbert.kernels.relative_attention")

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) that ptxas -v reports for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(capability)}", str(source), "-o", str(source) + ".o"]
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    registers = _REGISTERS.search(log)
    spills = _SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def aot_compile(fn, signature: dict, constexprs: dict, capability: int, num_warps: int, num_stages: int) -> dict:
    """Compile `fn` for sm_<capability>; returns {"registers", "spills", "shared"} (spills, shared in bytes).

    `signature` maps every argument name to its type ("*fp32", "*bf16", "i32", "fp32", ...; constexpr
    arguments as "constexpr"), `constexprs` maps the constexpr argument names to their values.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    registers, spills = _ptxas_usage(compiled.asm["ptx"], capability)
    return {"registers": registers, "spills": spills, "shared": compiled.metadata.shared}


def collect_cases() -> list[tuple]:
    """AOT_CASES of every kernel module."""
    return [case for module_name in KERNEL_MODULES for case in importlib.import_module(module_name).AOT_CASES]


def _describe(constexprs: dict, num_warps: int, num_stages: int) -> str:
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
    return f"{flags},warps={num_warps},stages={num_stages}"


def report(out=sys.stdout) -> list[dict]:
    """Compile every case for every capability and print one table row per compilation."""
    rows = []
    header = f"{'kernel':<34} {'cap':>4} {'regs':>5} {'spills':>6} {'shared':>7}  config"
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, fn, signature, constexprs, num_warps, num_stages in collect_cases():
        for capability in CAPABILITIES:
            usage = aot_compile(fn, signature, constexprs, capability, num_warps, num_stages)
            rows.append({"kernel": name, "capability": capability, **usage})
            print(f"{name:<34} {'sm_' + str(capability):>4} {usage['registers']:>5} {usage['spills']:>6} "
                  f"{usage['shared']:>7}  {_describe(constexprs, num_warps, num_stages)}", file=out, flush=True)
    return rows


if __name__ == "__main__":
    report()
