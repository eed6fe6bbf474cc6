"""`fastbert bench`: the openvino baseline (f32 hint and default precision) and the latency preset."""
from __future__ import annotations

import json

import pytest

from fastbert.bench import openvino_baseline
from fastbert.bench.run import LATENCY_REPEATS, BenchOptions
from fastbert.bench.timing import summarize
from fastbert.cli import main

needs_openvino = pytest.mark.skipif(bool(openvino_baseline.missing_packages()),
                                    reason="pip install 'fastbert[openvino]'")


def bench(*extra):
    return main(["bench", "--arch", "bert-tiny", "--device", "cpu", "--quiet", *extra])


@needs_openvino
def test_openvino_runs_f32_and_default_precision_cross_checked(tmp_path, capsys):
    json_path = tmp_path / "out.json"
    assert bench("--batch", "2", "--seq", "16", "--repeats", "2", "--warmup", "1",
                 "--baselines", "hf-sdpa,openvino", "--json", str(json_path)) == 0
    record = json.loads(json_path.read_text())
    results = record["configurations"][0]["results"]
    assert set(openvino_baseline.IMPLEMENTATIONS) <= set(results)
    assert record["openvino_precisions"]["openvino-f32"] == "f32"
    assert results["openvino-f32"]["max_abs_diff"] < 1e-4  # the f32 hint is held to fp32's tolerance
    assert "OpenVINO CPU plugin: openvino-f32 runs f32" in capsys.readouterr().out


def test_missing_openvino_extra_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(openvino_baseline, "missing_packages", lambda: ["openvino"])
    assert bench("--baselines", "openvino") == 1
    err = capsys.readouterr().err
    assert "pip install 'fastbert[openvino]'" in err and "openvino" in err


def test_openvino_refuses_training_and_bf16(capsys):
    if openvino_baseline.missing_packages():
        pytest.skip("the missing-extra message comes first")
    assert bench("--baselines", "openvino", "--mode", "training") == 1
    assert "CPU inference of an fp32 model only" in capsys.readouterr().err
    assert bench("--baselines", "openvino", "--dtype", "bf16") == 1


def test_latency_preset_defaults():
    latency = BenchOptions(batch=[1], seq=[16]).resolved()
    assert (latency.lengths, latency.repeats) == ("full", LATENCY_REPEATS)
    assert latency.warmup > 0
    sweep = BenchOptions(batch=[8], seq=[16]).resolved()
    assert sweep.lengths == "uniform" and sweep.repeats < LATENCY_REPEATS
    assert BenchOptions(batch=[1], seq=[16], lengths="uniform", repeats=5).resolved().repeats == 5


def test_summary_reports_p99():
    seconds = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    summary = summarize(seconds)
    assert summary["median_ms"] == pytest.approx(50.5) and summary["p99_ms"] == pytest.approx(99.0)
    assert summarize([0.002])["p99_ms"] == pytest.approx(2.0)


def test_latency_preset_prints_p99(capsys):
    assert bench("--batch", "1", "--seq", "8", "--repeats", "3", "--warmup", "0") == 0
    out = capsys.readouterr().out
    assert "p99 ms" in out and " 8 " in out
