"""`fastbert bench`: the onnxruntime baseline, --arch presets and model families (tiny shapes, CPU)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from fastbert.bench import models, onnx_baseline
from fastbert.bench.workloads import make_workload
from fastbert.cli import main

TINY = dict(num_hidden_layers=1, vocab_size=300, max_position_embeddings=80)
needs_onnx = pytest.mark.skipif(bool(onnx_baseline.missing_packages()), reason="pip install 'fastbert[onnx]'")


def bench(*extra):
    return main(["bench", "--batch", "2", "--seq", "16", "--repeats", "2", "--warmup", "1", "--device", "cpu",
                 "--quiet", *extra])


def tiny_dir(tmp_path, arch: str, **overrides):
    from fastbert.presets import preset_config

    config = preset_config(arch, hidden_size=32, num_attention_heads=2, intermediate_size=64, **TINY, **overrides)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path / arch)
    return str(tmp_path / arch)


@needs_onnx
def test_onnxruntime_baseline_is_fused_cross_checked_and_timed(tmp_path, capsys):
    json_path = tmp_path / "out.json"
    assert bench("--model", tiny_dir(tmp_path, "bert-base"), "--baselines", "hf-sdpa,onnxruntime",
                 "--json", str(json_path)) == 0
    record = json.loads(json_path.read_text())
    fused = record["onnxruntime_fused_operators"]
    assert fused.get("Attention") == 1 and fused.get("SkipLayerNormalization") == 2, fused
    result = record["configurations"][0]["results"]["onnxruntime"]
    assert result["median_ms"] > 0 and result["max_abs_diff"] < 1e-4


def test_missing_onnx_extra_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(onnx_baseline, "missing_packages", lambda: ["onnxruntime"])
    assert bench("--arch", "bert-tiny", "--baselines", "onnxruntime") == 1
    err = capsys.readouterr().err
    assert "pip install 'fastbert[onnx]'" in err and "onnxruntime" in err


def test_onnxruntime_refuses_training_mode(capsys):
    if onnx_baseline.missing_packages():
        pytest.skip("the missing-extra message comes first")
    assert bench("--arch", "bert-tiny", "--baselines", "onnxruntime", "--mode", "training") == 1
    assert "CPU fp32 inference only" in capsys.readouterr().err


def test_arch_preset_runs_and_reports_packed_weight_memory(capsys, tmp_path):
    json_path = tmp_path / "out.json"
    assert bench("--arch", "bert-tiny", "--json", str(json_path)) == 0
    out = capsys.readouterr().out
    assert "fastbert" in out
    if json.loads(json_path.read_text())["packed_weight_bytes"]:
        assert "packed oneDNN weights" in out


def test_unknown_arch_and_model_type_are_clear_errors(tmp_path, capsys):
    assert bench("--arch", "bert-huge") == 1
    assert "unknown preset" in capsys.readouterr().err
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert bench("--model", str(tmp_path / "gpt2")) == 1
    assert "model_type is 'gpt2'" in capsys.readouterr().err


def test_mpnet_runs_against_transformers_eager_attention(tmp_path):
    """transformers' MPNet has no SDPA attention: the reference (hf-sdpa) is its eager one, cross-checked."""
    json_path = tmp_path / "out.json"
    assert bench("--model", tiny_dir(tmp_path, "mpnet-base"), "--json", str(json_path)) == 0
    results = json.loads(json_path.read_text())["configurations"][0]["results"]
    assert set(results) == {"hf-sdpa", "fastbert"} and results["fastbert"]["max_abs_diff"] < 1e-4
    assert models.build_baseline("hf-sdpa", transformers.MPNetModel(transformers.MPNetConfig(
        **TINY, hidden_size=32, num_attention_heads=2, intermediate_size=64))).config._attn_implementation == "eager"


def test_deberta_v3_runs_cross_checked_against_transformers(tmp_path):
    """--model on a deberta-v3-shaped directory: fastbert (relative attention) against transformers' DeBERTa."""
    json_path = tmp_path / "out.json"
    assert bench("--model", tiny_dir(tmp_path, "deberta-v3-base", position_buckets=8), "--json", str(json_path)) == 0
    results = json.loads(json_path.read_text())["configurations"][0]["results"]
    assert set(results) == {"hf-sdpa", "fastbert"} and results["fastbert"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("arch", ["roberta-base", "distilbert-base", "mpnet-base"])
def test_family_workloads_fit_the_model(arch):
    from fastbert.presets import preset_config

    config = preset_config(arch, **TINY)
    work = make_workload(config, 3, 12, "uniform", torch.device("cpu"), seed=0)
    pad = config.pad_token_id or 0
    assert (work.inputs["input_ids"][~work.keep] == pad).all() and (work.inputs["input_ids"][work.keep] != pad).all()
    reference = models.build_reference(config, None, "inference")
    assert set(models.model_input_names(reference)) == set(work.inputs)


@needs_onnx
def test_export_leaves_the_model_in_eval_mode(tmp_path):
    """torch.onnx.export puts the exported wrapper's mode back onto the model: it must be eval, not training."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(config).eval()
    onnx_baseline.export(model, ("input_ids", "attention_mask"), tmp_path / "model.onnx")
    assert not any(module.training for module in model.modules())
