"""Presenting `fastbert bench` results: the terminal table, JSON, CSV and a speedup plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path

CSV_FIELDS = (
    "batch", "seq", "width", "real_tokens", "padding_fraction", "implementation", "median_ms", "p99_ms", "q1_ms",
    "q3_ms", "min_ms", "max_ms", "tokens_per_s", "speedup", "paired_speedup", "peak_memory_bytes", "mfu",
    "bandwidth_gb_s", "max_abs_diff",
)


class PlotUnavailableError(RuntimeError):
    """matplotlib (the optional extra "plot") is not installed."""


def rows(record: dict) -> list[dict]:
    """One flat row per (configuration, implementation)."""
    flat = []
    for conf in record["configurations"]:
        for name, result in conf["results"].items():
            row = {key: conf[key] for key in ("batch", "seq", "width", "real_tokens", "padding_fraction")}
            row["implementation"] = name
            row.update({key: result.get(key) for key in CSV_FIELDS if key in result})
            flat.append(row)
    return flat


def _memory(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _optional(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(record: dict) -> str:
    """The human-readable table printed by `fastbert bench`."""
    env, options = record["environment"], record["options"]
    device = env["device"]
    gpu = device["type"] == "cuda"
    header = [
        f"fastbert bench: {options['mode']}, {options['dtype']}, {device['name']} ({device['type']}), "
        f"lengths={options['lengths']}, repeats={options['repeats']} (warm-up {options['warmup']}), "
        f"backend={options['backend']}",
        f"torch {env['torch']}, transformers {env['transformers']}, fastbert {env['fastbert']}"
        + (f" @ {env['fastbert_commit'][:10]}" if env.get("fastbert_commit") else ""),
    ]
    columns = ["batch", "seq", "pad%", "implementation", "median ms", "p99 ms", "IQR ms", "min-max ms", "tokens/s",
               "speedup", "peak mem"]
    if gpu:
        columns += ["MFU", "GB/s"]
    table = [columns]
    for row in rows(record):
        line = [
            str(row["batch"]), str(row["width"]), f"{100 * row['padding_fraction']:.0f}", row["implementation"],
            f"{row['median_ms']:.2f}", _optional(row.get("p99_ms")), f"{row['q1_ms']:.2f}-{row['q3_ms']:.2f}",
            f"{row['min_ms']:.2f}-{row['max_ms']:.2f}", f"{row['tokens_per_s']:,.0f}",
            f"{row['speedup']:.2f}x", _memory(row["peak_memory_bytes"]),
        ]
        if gpu:
            line += [f"{100 * row['mfu']:.1f}%", f"{row['bandwidth_gb_s']:.0f}"]
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(r, widths)) for r in table]
    reference = record["configurations"][0]["reference"] if record["configurations"] else "hf-sdpa"
    footer = (
        f"speedup = median time of {reference} / median time; tokens/s counts real (non-padding) tokens; "
        "seq = padded batch width"
    )
    if gpu:
        footer += f"; MFU vs measured {options['dtype']} matmul peak {record['matmul_peak_flops'] / 1e12:.0f} TFLOP/s"
    if record.get("openvino_precisions"):
        chosen = ", ".join(f"{name} runs {precision}" for name, precision in record["openvino_precisions"].items())
        footer += f"\nOpenVINO CPU plugin: {chosen}"
    if record.get("packed_weight_bytes"):
        packed = _memory(record["packed_weight_bytes"])
        footer += f"\nfastbert's packed oneDNN weights: {packed} extra (FASTBERT_PACKED_WEIGHTS=0 turns them off)"
    return "\n".join(header + [""] + lines + ["", footer])


def write_json(record: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")


def write_csv(record: dict, path: str | Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows(record):
            writer.writerow(row)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailableError(
            "--plot needs matplotlib, which is not installed: pip install 'fastbert[plot]' (or matplotlib)"
        ) from None
    return plt


def write_plot(record: dict, path: str | Path) -> None:
    """PNG: speedup vs sequence length, one line per (batch size, implementation) other than the reference."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for conf in record["configurations"]:
        for name, result in conf["results"].items():
            if name != conf["reference"]:
                series.setdefault((conf["batch"], name), []).append((conf["seq"], result["speedup"]))
    for (batch, name), points in sorted(series.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name}, batch {batch}")
    axes.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    options = record["options"]
    reference = record["configurations"][0]["reference"] if record["configurations"] else "hf-sdpa"
    axes.set_xlabel("sequence length (cap)")
    axes.set_ylabel(f"speedup vs {reference}")
    axes.set_title(f"{options['mode']}, {options['dtype']}, lengths={options['lengths']}, "
                   f"{record['environment']['device']['name']}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
