"""The `fastbert` command:
  fastbert info       versions, devices, backends, extension status, a quick comparison
  fastbert bench      time fastbert against HuggingFace and other runtimes
  fastbert pretrain   pretrain BERT (MLM, NSP) on plain text
  fastbert serve      text-embeddings-inference-compatible HTTP server (TEI's command line too)

This module parses arguments; the work is in fastbert.bench, fastbert.pretrain and fastbert.serve.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys

from fastbert.pretrain.cli import add_arguments as add_pretrain_arguments
from fastbert.pretrain.cli import main as pretrain_main
from fastbert.serve.cli import add_arguments as add_serve_arguments
from fastbert.serve.cli import main as serve_main

LENGTHS_HELP = (
    "sequence lengths: full (no padding), uniform (one full-length sequence, the rest uniform in "
    "[max(1, seq//8), seq]), lognormal (median seq/4, right-skewed), or FILE with one token count per "
    "line (default: uniform; full for the latency preset --batch 1)"
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (but None and False: nothing to show); epilogs as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def version() -> str:
    """The installed distribution's version, else the package's own (a checkout on sys.path)."""
    try:
        return importlib.metadata.version("fastbert")
    except importlib.metadata.PackageNotFoundError:
        from fastbert import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description="fastbert: fast BERT encoder on fused kernels")
    parser.add_argument("--version", action="version", version=f"fastbert {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="one of these; `fastbert COMMAND --help` lists its options")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)

    info = command("info", "versions, devices, backends, extension status, a quick comparison")
    info.add_argument("--no-compare", action="store_true", help="skip the quick fastbert-vs-HF comparison")

    bench = command("bench", "time fastbert against HuggingFace (default: bert-base config, random weights)")
    bench.add_argument("--model", metavar="DIR", help="a local HuggingFace model directory of a supported family "
                       "(BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT, ALBERT, ModernBERT, MPNet, "
                       "DeBERTa-v2/v3)")
    bench.add_argument("--arch", metavar="NAME",
                       help="a built-in config with seeded random weights: bert-base, roberta-base, distilbert-base, "
                            "electra-base, albert-base, ... (fastbert/presets.py; default without --model: bert-base)")
    bench.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    bench.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "int8"),
                       help="default: bf16 on GPU, fp32 on CPU; int8: fastbert.quantize and bf16 vs ORT int8 and "
                            "OpenVINO with cosines to fp32 (fastbert/bench/reduced_precision.py), on the CPU; it "
                            "takes --model/--arch, --batch, --seq, --lengths full|uniform, --repeats, --warmup, "
                            "--threads, --json and refuses the other options")
    bench.add_argument("--batch", type=_int_list, help="batch sizes, comma list (default: 8 on CPU, 8,32 on GPU)")
    bench.add_argument("--seq", type=_int_list,
                       help="sequence lengths (caps), comma list (default: 64,128,256 on CPU, 128,256,512 on GPU)")
    bench.add_argument("--lengths", default=None, metavar="full|uniform|lognormal|FILE", help=LENGTHS_HELP)
    bench.add_argument("--mode", choices=("inference", "training"), default="inference",
                       help="training = forward + backward + AdamW step of BertForMaskedLM")
    bench.add_argument("--baselines", type=_name_list,
                       help="comma list of hf-eager, hf-sdpa, hf-compile, onnxruntime (CPU fp32 inference; "
                            "pip install 'fastbert[onnx]'), openvino (f32 hint and default precision; "
                            "pip install 'fastbert[openvino]') (default: hf-sdpa on CPU, hf-sdpa,hf-compile on GPU)")
    bench.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda", "cpp", "onednn"),
                       help="fastbert backend")
    bench.add_argument("--repeats", type=int, help="timed calls per implementation (default: 10 CPU, 30 GPU)")
    bench.add_argument("--warmup", type=int, help="untimed calls per implementation first (default: 2 CPU, 5 GPU)")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    bench.add_argument("--json", metavar="PATH", help="write the full record as JSON")
    bench.add_argument("--csv", metavar="PATH", help="write one row per configuration and implementation")
    bench.add_argument("--plot", metavar="PATH", help="PNG of speedup vs sequence length (needs matplotlib)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar (--dtype int8 shows none)")
    add_pretrain_arguments(command("pretrain", "pretrain BERT (MLM, NSP) on plain text"))
    add_serve_arguments(command("serve", "text-embeddings-inference-compatible HTTP server batching requests, "
                                "started with TEI's flags and environment variables (serve extra)"))
    return parser


def run_info(args) -> int:
    from fastbert.bench.info import info_report

    print(info_report(compare=not args.no_compare))
    return 0


# `bench --dtype int8` runs fastbert.bench.reduced_precision (fixed peers, CPU, results printed and --json):
# each option it cannot honour is refused rather than silently dropped. dest: (values it honours, why not others)
INT8_HONOURS = {
    "device": ((None, "cpu"), "it runs on the CPU"),
    "mode": (("inference",), "it times inference"),
    "lengths": ((None, "full", "uniform"), "it takes full or uniform"),
    "baselines": ((None,), "its peers are fixed: HF fp32, ORT int8, OpenVINO"),
    "backend": (("auto",), "it runs the default backend"),
    "seed": ((0,), "its inputs have a fixed seed"),
    "csv": ((None,), "it writes --json only"),
    "plot": ((None,), "it draws no chart"),
}


def check_int8_options(args) -> None:
    from fastbert.bench.run import BenchError

    refused = [f"--{dest} ({why})" for dest, (honoured, why) in INT8_HONOURS.items()
               if getattr(args, dest) not in honoured]
    if refused:
        raise BenchError(f"--dtype int8 does not take {', '.join(refused)}")


def run_bench_command(args) -> int:
    from fastbert.bench import report
    from fastbert.bench.run import BenchOptions, run_bench

    if args.dtype == "int8":  # quantized: its own comparison (cosine to fp32 next to time, no tolerance check)
        from fastbert.bench import reduced_precision

        check_int8_options(args)
        return reduced_precision.run_from_cli(args)
    if args.plot:
        report._pyplot()  # fail before the run, not after it
    options = BenchOptions(
        model=args.model, arch=args.arch, device=args.device, dtype=args.dtype, batch=args.batch, seq=args.seq,
        lengths=args.lengths, mode=args.mode, baselines=args.baselines, backend=args.backend,
        repeats=args.repeats, warmup=args.warmup, threads=args.threads, seed=args.seed, progress=not args.quiet,
    )
    record = run_bench(options)
    print(report.format_table(record))
    for path, write in ((args.json, report.write_json), (args.csv, report.write_csv), (args.plot, report.write_plot)):
        if path:
            write(record, path)
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pretrain":
        return pretrain_main(args)
    if args.command == "serve":
        return serve_main(args)
    from fastbert.bench.errors import USER_ERRORS

    try:
        return run_info(args) if args.command == "info" else run_bench_command(args)
    except USER_ERRORS as exc:
        print(f"fastbert {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
