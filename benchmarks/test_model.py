"""End-to-end model benchmarks: fastbert.BertModel vs HuggingFace BertModel (SDPA), forward, CPU fp32.

bert-base widths (hidden 768, 12 heads, intermediate 3072) with 4 layers instead of 12 so a CPU run
stays short; batch 8 x 128, padded (lengths uniform in [16, 128], one full) and unpadded. Compare
side by side with

    python -m pytest benchmarks/test_model.py --benchmark-group-by=param

For the full-size comparison with interleaved timing use `fastbert bench` (docs/benchmarks.md).
"""
from __future__ import annotations

import pytest
import torch
import transformers

import fastbert
from fastbert.bench.workloads import make_workload

LAYERS = 4  # everything else: transformers.BertConfig() defaults (bert-base)
SMOKE_LAYERS = 1  # under --benchmark-disable (the CI smoke test) nothing is timed: keep it quick
BATCH, SEQ = 8, 128
LENGTHS = {"padded": "uniform", "unpadded": "full"}


@pytest.fixture(scope="module")
def models(request):
    torch.manual_seed(0)
    smoke = request.config.getoption("benchmark_disable", False)
    config = transformers.BertConfig(num_hidden_layers=SMOKE_LAYERS if smoke else LAYERS)
    config._attn_implementation = "sdpa"
    hf = transformers.BertModel(config).eval()
    fast = fastbert.BertModel(config).eval()
    fast.load_state_dict(hf.state_dict())
    return {"hf_sdpa": hf, "fastbert": fast}


@pytest.fixture(scope="module", params=list(LENGTHS))
def workload(request, models):
    work = make_workload(models["hf_sdpa"].config, BATCH, SEQ, LENGTHS[request.param], torch.device("cpu"), seed=0)
    with torch.inference_mode():
        expected = models["hf_sdpa"](**work.inputs).last_hidden_state[work.keep]
        got = models["fastbert"](**work.inputs).last_hidden_state[work.keep]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # never time a wrong answer
    return work


def _forward(model, work):
    with torch.inference_mode():
        return model(**work.inputs).last_hidden_state


def test_hf_sdpa(benchmark, models, workload):
    benchmark.extra_info.update(real_tokens=workload.real_tokens, padding=round(workload.padding_fraction, 3))
    benchmark.pedantic(_forward, args=(models["hf_sdpa"], workload), rounds=5, warmup_rounds=1)


def test_fastbert(benchmark, models, workload):
    benchmark.extra_info.update(real_tokens=workload.real_tokens, padding=round(workload.padding_fraction, 3))
    benchmark.pedantic(_forward, args=(models["fastbert"], workload), rounds=5, warmup_rounds=1)
