"""`fastbert info` and `fastbert bench` end to end on a tiny random BERT (CPU, a few seconds each)."""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import sys

import pytest
import torch
import transformers

import fastbert
from fastbert.cli import build_parser, main

TINY = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(path)
    return path


def bench(model_dir, *extra):
    return main(["bench", "--model", str(model_dir), "--batch", "2", "--seq", "16", "--repeats", "2",
                 "--warmup", "1", "--device", "cpu", "--quiet", *extra])


def test_info_prints_backends(capsys, monkeypatch):
    monkeypatch.setattr("fastbert.bench.info.QUICK_CONFIG", TINY)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in fastbert.available_backends():
        assert f"  {name}: " in out
    assert "torch " in out and "transformers " in out and "extension fastbert._C" in out
    assert "quick check" in out and "max abs diff" in out


def test_info_says_what_the_bound_cpu_kernels_run(capsys, monkeypatch):
    """One table: the few-rows GEMMs and the attention on the fused QKV output appear as what the linear and
    qkv_attention entries bind on this machine, not as a second table."""
    from fastbert.cpu import few_rows_linear
    from fastbert.cpu.attention import fused_qkv_max_seqlen

    monkeypatch.setattr("fastbert.bench.info.QUICK_CONFIG", TINY)
    assert main(["info", "--no-compare"]) == 0
    out = capsys.readouterr().out
    assert "CPU inference plans" not in out
    limit = fused_qkv_max_seqlen()
    lengths = "every length" if limit == float("inf") else f"at most {limit} tokens"
    assert f"the kernel on the fused QKV buffer for sequences of {lengths}" in out
    lines = out.splitlines()
    line = next(line for line in lines[lines.index("  linear:"):] if line.startswith("    onednn: cpu;"))
    for dtype in (torch.bfloat16, torch.float32):
        name = few_rows_linear.kernel_name(dtype)
        dtype_name = str(dtype)[6:]
        assert (f"{dtype_name} on fastbert's {name} kernel up to {few_rows_linear.max_rows(dtype, None)} rows" in line
                if name else f"{dtype_name} few-rows kernel off: " in line)
    # why not the others: the int8 GEMM entry says why it cannot run here, and what runs instead
    from fastbert.cpu import int8_linear

    int8 = lines[lines.index("  int8_linear:"):]
    entry, runs = (next(line for line in int8 if line.startswith(start)) for start in ("    onednn:", "    runs here:"))
    problem = int8_linear.problem()
    assert (f"off here: {problem}" in entry and "cpu float32 -> torch" in runs) if problem else \
        ("off here" not in entry and "cpu float32 -> onednn" in runs)
    from fastbert.cpu import onednn_linear

    try:
        onednn_linear.set_packing(False)
        assert main(["info", "--no-compare"]) == 0
        assert "packed weights are switched off" in capsys.readouterr().out
    finally:
        onednn_linear.set_packing(True)


def test_info_and_results_name_the_cpu_features(capsys, monkeypatch, tmp_path):
    """Kernel rankings differ between CPUs (AMX or not), so `info` and every result say which features ran."""
    from fastbert.bench import environment
    from fastbert.cpu import info as cpu_info

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    real_path = cpu_info.Path
    monkeypatch.setattr(cpu_info, "Path", lambda name: cpuinfo if name == "/proc/cpuinfo" else real_path(name))
    cpu_info._read_features.cache_clear()  # read once per process: read the fake file
    try:
        assert environment.cpu_features() == ["avx2", "avx512f", "amx_bf16"]
        assert environment.device_info(torch.device("cpu"))["features"] == ["avx2", "avx512f", "amx_bf16"]
        monkeypatch.setattr("fastbert.bench.info.QUICK_CONFIG", TINY)
        assert main(["info", "--no-compare"]) == 0
        assert "features: avx2 avx512f amx_bf16" in capsys.readouterr().out
        cpuinfo.unlink()
        cpu_info._read_features.cache_clear()
        assert environment.cpu_features() == []
    finally:
        cpu_info._read_features.cache_clear()  # later tests read the real file again


def test_python_dash_m_runs_info(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fastbert", "info", "--no-compare"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "backends:" in done.stdout


def test_bench_prints_table_and_writes_json_csv(tiny_model_dir, tmp_path, capsys):
    json_path, csv_path = tmp_path / "out.json", tmp_path / "out.csv"
    assert bench(tiny_model_dir, "--baselines", "hf-sdpa,hf-eager", "--json", str(json_path),
                 "--csv", str(csv_path)) == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "fastbert" in out and "hf-sdpa" in out and "hf-eager" in out

    record = json.loads(json_path.read_text())
    assert record["environment"]["torch"] == torch.__version__
    assert record["environment"]["device"]["type"] == "cpu"
    assert record["options"]["batch"] == [2] and record["options"]["lengths"] == "uniform"
    (conf,) = record["configurations"]
    assert conf["batch"] == 2 and conf["width"] == 16 and conf["real_tokens"] == sum(conf["lengths"])
    fast = conf["results"]["fastbert"]
    for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "tokens_per_s", "speedup", "max_abs_diff"):
        assert isinstance(fast[key], float), key
    assert len(fast["times_ms"]) == 2 and fast["peak_memory_bytes"] is None
    assert conf["results"]["hf-sdpa"]["speedup"] == pytest.approx(1.0)

    table = list(csv.DictReader(csv_path.open()))
    assert {row["implementation"] for row in table} == {"fastbert", "hf-sdpa", "hf-eager"}
    assert all(float(row["median_ms"]) > 0 and float(row["tokens_per_s"]) > 0 for row in table)


def test_cross_check_stops_a_wrong_answer(tiny_model_dir, monkeypatch, capsys):
    original = fastbert.BertModel.forward

    def off_by_one(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        output.last_hidden_state = output.last_hidden_state + 1
        return output

    monkeypatch.setattr(fastbert.BertModel, "forward", off_by_one)
    assert bench(tiny_model_dir) == 1
    err = capsys.readouterr().err
    assert "fastbert disagrees with hf-sdpa" in err and "max abs diff" in err


def test_lengths_file_and_sweep(tiny_model_dir, tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("# token counts\n3\n5\n\n7\n")
    json_path = tmp_path / "out.json"
    assert main(["bench", "--model", str(tiny_model_dir), "--batch", "2,3", "--seq", "6", "--repeats", "2",
                 "--warmup", "0", "--lengths", str(lengths), "--json", str(json_path), "--quiet"]) == 0
    record = json.loads(json_path.read_text())
    assert [c["batch"] for c in record["configurations"]] == [2, 3]
    for conf in record["configurations"]:
        assert set(conf["lengths"]) <= {3, 5, 6}  # 7 truncated to the cap 6
        assert conf["width"] == max(conf["lengths"])


def test_bad_lengths_file_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("12\nabc\n")
    assert bench(tiny_model_dir, "--lengths", str(lengths)) == 1
    assert "expected a token count" in capsys.readouterr().err


def test_training_mode_runs(tiny_model_dir, capsys):
    assert bench(tiny_model_dir, "--mode", "training", "--lengths", "lognormal") == 0
    out = capsys.readouterr().out
    assert "training" in out and "fastbert" in out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_writes_png(tiny_model_dir, tmp_path):
    path = tmp_path / "speedup.png"
    assert main(["bench", "--model", str(tiny_model_dir), "--batch", "2", "--seq", "8,16", "--repeats", "2",
                 "--warmup", "0", "--quiet", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert bench(tiny_model_dir, "--plot", str(tmp_path / "speedup.png")) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err


def _subcommands():
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return {"fastbert": parser, **commands.choices}


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
               for name, parser in _subcommands().items() for action in parser._actions
               if not action.help or not action.help.strip()]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("command, shown", [("bench", "(default: auto)"), ("pretrain", "(default: 0.0001)"),
                                            ("serve", "(default: 16384)")])
def test_help_shows_defaults(command, shown, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert shown in text and "(default: None)" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastbert {importlib.metadata.version('fastbert')}"


def test_cli_docstring_names_every_command():
    import fastbert.cli

    for name in _subcommands():
        assert name in fastbert.cli.__doc__


def test_int8_refuses_the_options_it_cannot_honour(tiny_model_dir, tmp_path, capsys):
    assert bench(tiny_model_dir, "--dtype", "int8", "--device", "cuda", "--mode", "training", "--lengths",
                 "lognormal", "--baselines", "hf-sdpa", "--backend", "torch", "--seed", "3", "--csv",
                 str(tmp_path / "x.csv"), "--plot", str(tmp_path / "x.png")) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastbert bench: error: --dtype int8 does not take --device (it runs on the CPU)")
    for flag in ("--device", "--mode", "--lengths", "--baselines", "--backend", "--seed", "--csv", "--plot"):
        assert f"{flag} (" in err
    from fastbert.cli import check_int8_options

    check_int8_options(build_parser().parse_args(["bench", "--dtype", "int8", "--device", "cpu", "--lengths",
                                                  "uniform", "--quiet", "--json", "x.json"]))  # all honoured
