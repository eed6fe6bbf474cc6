"""`fastbert info`: what fastbert finds on this machine, and a quick fastbert-vs-HuggingFace check."""
from __future__ import annotations

import torch
import transformers

from fastbert.bench import environment
from fastbert.cpu import allocator

# A small BERT for the quick comparison: a few forward passes take well under a second on CPU.
QUICK_CONFIG = dict(
    vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
    max_position_embeddings=128,
)


def _device_lines() -> list[str]:
    lines = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            info = environment.device_info(torch.device("cuda", index))
            lines.append(
                f"  cuda:{index}: {info['name']}, capability {info['capability']}, {info['memory_gib']} GiB, "
                f"driver {info['driver'] or 'unknown'}, CUDA runtime {info['cuda_runtime']}"
            )
    else:
        lines.append("  cuda: none (torch.cuda.is_available() is False)")
    cpu = environment.device_info(torch.device("cpu"))
    features = " ".join(cpu["features"]) or "unknown"
    lines.append(f"  cpu: {cpu['name']}, {cpu['cpu_count']} cores, torch threads {cpu['torch_threads']}, "
                 f"features: {features}")
    return lines


def _names(values, name) -> str:
    return ", ".join(sorted(name(value) for value in values))


def _note(implementation) -> str | None:
    """What an implementation's binding runs on this machine, where it composes kernels (registry note)."""
    if implementation.note is None:
        return None
    import importlib

    module_name, attribute = implementation.note.split(":")
    return getattr(importlib.import_module(module_name), attribute)()


def _op_lines() -> list[str]:
    """Per op, from the capability registry: each backend's devices and dtypes (and why it cannot run here), the
    auto order, and what auto runs here for an inference call of BERT-base's shapes."""
    from fastbert.backend import REGISTRY

    lines = []
    for op in REGISTRY.ops():
        lines.append(f"  {op}:")
        for name in REGISTRY.backends_of(op):
            implementation = REGISTRY.get(op, name)
            devices = _names(implementation.devices, str) if implementation.devices else "any device"
            dtypes = _names(implementation.dtypes, lambda d: str(d).replace("torch.", "")) if implementation.dtypes \
                else "any dtype"
            notes = [note for note in (_note(implementation), _off_here(implementation)) if note]
            lines.append(f"    {name}: {devices}; {dtypes}" + "".join(f" ({note})" for note in notes))
        order = "; ".join(f"{device} {' > '.join(REGISTRY.auto_order(op, device))}"
                          for device in sorted(REGISTRY.auto_preference))
        lines.append(f"    auto: {order}")
        lines.append(f"    runs here: {_runs_here(REGISTRY, op)}")
    return lines


def _here_signatures(op: str) -> list:
    """Inference calls on this machine's devices at BERT-base's row width and head size, fp32 and bf16."""
    from fastbert.registry import Signature

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [Signature(op, device, dtype, 768, 64) for device in devices for dtype in (torch.float32, torch.bfloat16)]


def _off_here(implementation) -> str | None:
    """Why an implementation cannot take this machine's calls (the first reason), or None."""
    problems = [implementation.problem(signature) for signature in _here_signatures(implementation.op)
                if implementation.devices is None or signature.device in implementation.devices]
    problems = [problem for problem in problems if problem is not None]
    return f"off here: {problems[0]}" if problems and len(problems) == len(_here_signatures(implementation.op)) \
        else None


def _runs_here(registry, op: str) -> str:
    return ", ".join(f"{signature.device} {str(signature.dtype).replace('torch.', '')} -> "
                     f"{registry.resolve('auto', signature).backend}" for signature in _here_signatures(op))


def _machine_lines() -> list[str]:
    """The machine record and each CPU-dependent choice made from it, with the benchmark that decided it."""
    from fastbert.cpu.machine import CHOICES, choice, machine

    record = machine()
    lines = [f"  {record.name}: {' '.join(sorted(record.features)) or 'no listed features'} (from {record.source})"]
    for name, row in CHOICES.items():
        lines.append(f"  {name} = {choice(name)}: {row.says} [decided by {row.benchmark}]")
    return lines


def quick_comparison() -> str:
    """fastbert vs HF sdpa on QUICK_CONFIG, batch 4 x 64 with uniform lengths: diff and speedup."""
    from fastbert.bench.run import BenchOptions, run_bench

    options = BenchOptions(batch=[4], seq=[64], repeats=5, warmup=1, baselines=["hf-sdpa"], progress=False)
    record = run_bench(options, config=transformers.BertConfig(**QUICK_CONFIG))
    conf = record["configurations"][0]
    fast, ref = conf["results"]["fastbert"], conf["results"][conf["reference"]]
    return (
        f"quick check ({record['options']['device']}, {record['options']['dtype']}, 4-layer hidden-256 BERT, "
        f"batch 4 x {conf['width']}, {100 * conf['padding_fraction']:.0f}% padding): "
        f"max abs diff vs HF {fast['max_abs_diff']:.2g}, fastbert {fast['median_ms']:.1f} ms vs "
        f"hf-sdpa {ref['median_ms']:.1f} ms ({fast['speedup']:.2f}x). For real numbers: fastbert bench"
    )


def info_report(compare: bool = True) -> str:
    versions = environment.versions()
    lines = [
        f"fastbert {versions['fastbert']}" + (f" (commit {versions['fastbert_commit']})" if versions["fastbert_commit"]
                                               else " (not a git checkout)"),
        f"python {versions['python']}, torch {versions['torch']}, triton {versions['triton']}, "
        f"transformers {versions['transformers']}",
        "devices:",
        *_device_lines(),
        "backends:",
        *[f"  {name}: {'available' if ok is True else ok}" for name, ok in environment.backends().items()],
        f"extension fastbert._C: {environment.extension_status()}",
        f"CPU allocator: {allocator.state()}",
        "ops (backend: devices; dtypes, per-call limits aside):",
        *_op_lines(),
        "CPU choices (fastbert/cpu/machine.py; re-run the named benchmark on a new kind of CPU):",
        *_machine_lines(),
    ]
    if compare:
        lines.append(quick_comparison())
    return "\n".join(lines)
