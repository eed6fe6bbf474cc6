"""Smoke test of benchmarks/isolated_latency.py: one round, two repeats, a tiny random BERT, a padded batch.

Each runtime runs in its own child process, as in a real measurement; nothing here is timed against a
target: the test checks the JSON's shape and that every runtime's output matches HF fp32 on real tokens.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from fastbert.cpu import allocator

SCRIPT = Path(__file__).with_name("isolated_latency.py")
BATCH, SEQ, PADDING = 3, 32, 0.4


def _load_script():
    spec = importlib.util.spec_from_file_location("isolated_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


isolated_latency = _load_script()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A seeded random BERT (hidden 32, 2 layers) with all-MiniLM-L6-v2's tokenizer (its vocabulary: 30522)."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=30522)
    transformers.BertModel(config).save_pretrained(folder)
    isolated_latency.copy_tokenizer(folder)
    return folder


def _run(tiny_model: Path, tmp_path: Path, runtimes: list[str], allocators: str = "default") -> dict:
    output = tmp_path / "result.json"
    isolated_latency.main(["--model", str(tiny_model), "--batch", str(BATCH), "--seq", str(SEQ),
                           "--padding", str(PADDING), "--rounds", "1", "--repeats", "2", "--warmup", "1",
                           "--threads", "1", "--calibration", "16", "--runtimes", ",".join(runtimes),
                           "--allocators", allocators, "--json", str(output)])
    return json.loads(output.read_text())


def test_fp32_runtimes_match_hf_on_real_tokens(tiny_model, tmp_path):
    record = _run(tiny_model, tmp_path, ["hf-sdpa", "fastbert-fp32"])
    assert list(record["results"]) == ["hf-sdpa", "fastbert-fp32"]
    assert (record["config"]["batch"], record["config"]["seq"], record["config"]["padding"]) == (BATCH, SEQ, PADDING)
    assert record["config"]["model"] == str(tiny_model)
    assert "features" in record["environment"]["cpu"] and record["environment"]["versions"]["torch"]
    clock = record["environment"]["clock_probe_gflops"]  # the machine's clock before and after the run
    assert clock["before"] > 0 and clock["after"] > 0
    assert 0.1 < record["padding_fraction"] < 0.6  # rows really are padded
    for name, result in record["results"].items():
        assert len(result["round_medians_ms"]) == 1 and result["median_ms"] > 0, name
        assert len(result["round_minor_faults_per_forward"]) == 1, name
        assert result["round_minor_faults_per_forward"][0] >= 0, name
        assert result["cosine_to_hf_fp32_min"] > 0.999, name


@pytest.mark.skipif(allocator.problem() is not None, reason=f"keep_freed_memory: {allocator.problem()}")
def test_allocators_time_each_runtime_with_glibc_as_is_and_with_freed_memory_kept(tiny_model, tmp_path):
    results = _run(tiny_model, tmp_path, ["fastbert-fp32"], allocators="default,keep")["results"]
    assert list(results) == ["fastbert-fp32", "fastbert-fp32+keep"]
    assert results["fastbert-fp32"]["allocator"].startswith("glibc's default")
    assert results["fastbert-fp32+keep"]["allocator"].startswith("freed memory kept")  # the child applied it
    assert results["fastbert-fp32+keep"]["cosine_to_hf_fp32_min"] > 0.999


REQUIRES = {"fastbert-int8": (), "fastbert-int8-bf16": (), "ort-int8": ("onnxruntime", "onnx"),
            "openvino-f32": ("openvino", "onnx")}
# int8 is close, not exact
MIN_COSINE = {"fastbert-int8": 0.9, "fastbert-int8-bf16": 0.9, "ort-int8": 0.9, "openvino-f32": 0.999}


@pytest.mark.parametrize("runtime", list(REQUIRES))
def test_int8_and_exported_runtimes(tiny_model, tmp_path, runtime):
    missing = [name for name in REQUIRES[runtime] if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{runtime} needs {', '.join(missing)} (pip install 'fastbert[onnx,openvino]')")
    result = _run(tiny_model, tmp_path, [runtime])["results"][runtime]  # the HF fp32 reference runs untimed
    assert len(result["round_medians_ms"]) == 1 and result["median_ms"] > 0
    assert result["cosine_to_hf_fp32_min"] > MIN_COSINE[runtime]
    if runtime.startswith("fastbert-int8"):  # the first child's quantization report: 6 encoder Linears per layer
        assert result["int8"]["quantized"] + len(result["int8"]["kept"]) == 6 * 2
    if runtime == "openvino-f32":
        assert result["precision"] == "f32"
