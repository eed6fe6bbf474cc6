"""`fastbert bench`: options, the cross-check, and the sweep over (batch, seq) configurations."""
from __future__ import annotations

import itertools
import sys
from dataclasses import asdict, dataclass, field

import torch

from fastbert.bench import environment
from fastbert.bench.models import BASELINES, FASTBERT, build_implementations, load_config
from fastbert.bench.timing import interleaved_times, paired_speedup, peak_memory, summarize
from fastbert.bench.workloads import forward_bytes, forward_flops, make_workload
from fastbert.cpu import onednn_linear
from fastbert.models import plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Cross-check tolerance on real tokens, relative to the reference's scale max(1, max |ref|).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
REFERENCE = "hf-sdpa"
LATENCY_REPEATS = 300  # --batch 1: enough calls per implementation for a p99


class BenchError(RuntimeError):
    """The benchmark cannot produce an honest result; the message says why."""


class MismatchError(BenchError):
    """An implementation's output differs from HuggingFace's beyond the tolerance."""


@dataclass
class BenchOptions:
    model: str | None = None
    arch: str | None = None  # a fastbert/presets.py name: that shape with seeded random weights
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    batch: list[int] | None = None
    seq: list[int] | None = None
    lengths: str | None = None  # None: "full" for the latency preset (batch 1), else "uniform"
    mode: str = "inference"
    baselines: list[str] | None = None
    backend: str = "auto"
    repeats: int | None = None
    warmup: int | None = None
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "BenchOptions":
        """A copy with every device-dependent default filled in."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = torch.device(device).type == "cuda"
        # The latency preset: one request at a time (--batch 1) is timed over many repeats, p50 and p99.
        latency = self.batch == [1]
        return BenchOptions(
            model=self.model,
            arch=self.arch,
            device=device,
            dtype=self.dtype or ("bf16" if on_gpu else "fp32"),
            batch=self.batch or ([8, 32] if on_gpu else [8]),
            seq=self.seq or ([128, 256, 512] if on_gpu else [64, 128, 256]),
            lengths=self.lengths or ("full" if latency else "uniform"),
            mode=self.mode,
            baselines=self.baselines or (["hf-sdpa", "hf-compile"] if on_gpu else ["hf-sdpa"]),
            backend=self.backend,
            repeats=self.repeats or (LATENCY_REPEATS if latency else 30 if on_gpu else 10),
            warmup=self.warmup if self.warmup is not None else (20 if latency else 5 if on_gpu else 2),
            threads=self.threads,
            seed=self.seed,
            progress=self.progress,
            extra=dict(self.extra),
        )


def validate(options: BenchOptions) -> None:
    unknown = [b for b in options.baselines if b not in BASELINES]
    if unknown:
        raise BenchError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    if options.dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.mode not in ("inference", "training"):
        raise BenchError(f"mode must be inference or training, got {options.mode!r}")
    if torch.device(options.device).type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch sees no CUDA device")
    if options.repeats < 1 or options.warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    if min(options.batch) < 1 or min(options.seq) < 1:
        raise BenchError("--batch and --seq values must be >= 1")


def cross_check(impls: dict, workload, dtype: torch.dtype, reference: str) -> dict[str, float]:
    """Max abs difference from the reference on real tokens, per implementation; raises MismatchError."""
    keep = workload.keep
    expected = impls[reference].output(workload)[keep].float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    diffs = {reference: 0.0}
    for name, impl in impls.items():
        if name == reference:
            continue
        # an implementation that runs in another precision than asked (openvino-default) says so
        tolerance_dtype = getattr(impl, "tolerance_dtype", dtype)
        tolerance = TOLERANCE[tolerance_dtype] * scale
        got = impl.output(workload)[keep].float()
        diff = (got - expected).abs().max().item() if got.numel() else 0.0
        if not diff <= tolerance:  # also catches NaN
            raise MismatchError(
                f"{name} disagrees with {reference} at batch={workload.batch} seq={workload.seq}: "
                f"max abs diff on real tokens {diff:.3g} > tolerance {tolerance:.3g} "
                f"({TOLERANCE[tolerance_dtype]:g} x scale {scale:.3g}); no timing was reported"
            )
        diffs[name] = diff
    return diffs


def _throughput_figures(config, workload, impl, median_s: float, matmul_peak: float | None, mode: str) -> dict:
    """tokens/s on real tokens; on CUDA also MFU and achieved bandwidth (estimates, see docs)."""
    figures = {"tokens_per_s": workload.real_tokens / median_s}
    if matmul_peak is None:
        return figures
    passes = 3 if mode == "training" else 1  # backward ~ 2x forward
    flops = passes * forward_flops(config, workload.lengths, with_mlm_head=mode == "training")
    param_bytes = sum(p.numel() * p.element_size() for p in impl.model.parameters())
    element = next(impl.model.parameters()).element_size()
    moved = passes * forward_bytes(config, workload.lengths, param_bytes, element)
    figures["mfu"] = flops / median_s / matmul_peak
    figures["bandwidth_gb_s"] = moved / median_s / 1e9
    return figures


def run_configuration(impls, config, options, batch, seq, dtype, device, matmul_peak) -> dict:
    """Cross-check, then time every implementation interleaved on one (batch, seq) workload."""
    workload = make_workload(config, batch, seq, options.lengths, device, options.seed + 1000 * batch + seq)
    reference = REFERENCE if REFERENCE in impls else next(iter(impls))
    diffs = cross_check(impls, workload, dtype, reference)
    calls = {name: (lambda impl=impl: impl.step(workload)) for name, impl in impls.items()}
    times = interleaved_times(calls, options.repeats, options.warmup, device)
    reference_ms = summarize(times[reference])["median_ms"]
    results = {}
    for name, impl in impls.items():
        summary = summarize(times[name])
        median_s = summary["median_ms"] / 1e3
        summary.update(_throughput_figures(config, workload, impl, median_s, matmul_peak, options.mode))
        summary["speedup"] = reference_ms / summary["median_ms"]
        summary["paired_speedup"] = paired_speedup(times[reference], times[name])
        summary["peak_memory_bytes"] = peak_memory(calls[name], device)
        summary["max_abs_diff"] = diffs[name]
        results[name] = summary
    return {
        "batch": batch,
        "seq": seq,
        "width": workload.width,
        "real_tokens": workload.real_tokens,
        "padding_fraction": workload.padding_fraction,
        "lengths": workload.lengths.tolist(),
        "reference": reference,
        "results": results,
    }


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr if tqdm is installed, else a plain stderr line per step."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fastbert bench", unit="config", file=sys.stderr, leave=False)


def run_bench(options: BenchOptions, config=None) -> dict:
    """Run the sweep; returns the JSON-ready record (environment, options, per-configuration results).

    `config` (a transformers config) overrides the model: random weights of that shape."""
    options = options.resolved()
    validate(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    config = config if config is not None else load_config(options.model, options.arch)
    impls = build_implementations(options, config, device, dtype)
    matmul_peak = environment.measure_matmul_peak(device, dtype) if device.type == "cuda" else None
    sweep = list(itertools.product(options.batch, options.seq))
    bar = _progress(len(sweep), options.progress)
    configurations = []
    for index, (batch, seq) in enumerate(sweep, start=1):
        if bar is not None:
            bar.set_postfix_str(f"batch={batch} seq={seq}")
        elif options.progress:
            print(f"fastbert bench: [{index}/{len(sweep)}] batch={batch} seq={seq}", file=sys.stderr, flush=True)
        configurations.append(run_configuration(impls, config, options, batch, seq, dtype, device, matmul_peak))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "fastbert_bench_version": 1,
        "environment": {
            **environment.versions(),
            "device": environment.device_info(device),
            "backends": environment.backends(),
            "extension": environment.extension_status(),
        },
        "options": asdict(options),
        "model_config": {"model_type": config.model_type, **{k: getattr(config, k, None) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")}},
        "matmul_peak_flops": matmul_peak,
        "implementations": list(impls),
        "onnxruntime_fused_operators": getattr(impls.get("onnxruntime"), "fused_operators", None),
        "openvino_precisions": {name: impl.precision for name, impl in impls.items() if hasattr(impl, "precision")},
        "plans": plan.plans_enabled(),
        "packed_weight_bytes": onednn_linear.cache_bytes(),  # extra memory of the packed GEMM weights
        "fastbert": FASTBERT,
        "configurations": configurations,
    }
