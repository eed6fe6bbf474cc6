"""A build without the compiled extension (FASTBERT_NO_EXT=1, or a failed C++ build) runs every model on the
torch/oneDNN path with the extension's results: every family and ModernBERT, native and patched, fp32 and bf16,
inference and a training step; int8 quantize refuses, naming the extension; `fastbert info` says why "cpp" is
off; `fastbert serve` answers /embed.

The extension is probed once per process, so the side without it runs in a fresh process with FASTBERT_NO_EXT=1
(_extension_free_run.py), while this process computes the same with the extension.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbert import backend
from fastbert.models.families import FAMILIES
from tests.models import _extension_free_run as run

ROOT = Path(__file__).resolve().parents[2]
FP32_TOLERANCE = 1e-5  # x max(1, max |value|): the project's fp32 rule
# Four bf16 epsilons, x max(1, max |value|): the two sides round in different places (the extension's fused
# LayerNorm and GELU, fastbert's few-rows GEMMs); measured up to 0.0054, one bf16 step at |x| ~ 3.
BF16_TOLERANCE = 4 * torch.finfo(torch.bfloat16).eps


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{"without": the results with FASTBERT_NO_EXT=1 (a fresh process), "with": this process's (the extension
    where it is built)}, computed at once."""
    out = tmp_path_factory.mktemp("extension_free") / "without.pt"
    env = {key: value for key, value in os.environ.items() if key != "FASTBERT_BACKEND"}
    process = subprocess.Popen([sys.executable, "-m", "tests.models._extension_free_run", str(out)], cwd=ROOT,
                               env={**env, "FASTBERT_NO_EXT": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        with run.strict(), backend.use_backend("auto"):
            with_extension = run.compared()
    finally:
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"the run without the extension failed:\n{output[-4000:]}"
    return {"without": torch.load(out), "with": with_extension}


def test_the_extension_free_run_never_loads_it(runs):
    assert runs["without"]["loaded _C"] is False


def test_every_model_matches_the_extensions_results(runs):
    without, with_ = runs["without"]["models"], runs["with"]["models"]
    # every family of the table and ModernBERT x native/patched x fp32/bf16 x inference/training
    assert without.keys() == with_.keys() and len(without) == (len(FAMILIES) + 1) * 2 * 2 * 2
    failures = []
    for case, values in without.items():
        tolerance = BF16_TOLERANCE if " bf16 " in case else FP32_TOLERANCE
        for name, value in values.items():
            reference = with_[case][name]
            assert torch.isfinite(value).all(), f"{case}: {name} is not finite"
            error = (value.double() - reference.double()).abs().max().item()
            if error > tolerance * max(1.0, reference.abs().max().item()):
                failures.append(f"{case} {name}: {error:.3g}")
    assert not failures, failures


def test_a_training_step_has_gradients_everywhere(runs):
    for case, values in runs["without"]["models"].items():
        if case.endswith("training"):
            assert len(values) > 10, f"{case}: gradients of only {sorted(values)}"  # the loss and the grads


def test_int8_quantize_refuses_naming_the_extension(runs):
    refusal = runs["without"]["quantize"]
    assert refusal is not None and "fastbert._C" in refusal and "FASTBERT_NO_EXT" in refusal, refusal


def test_info_says_why_cpp_is_off(runs):
    lines = runs["without"]["info"].splitlines()
    assert "  cpp: disabled by FASTBERT_NO_EXT=1" in lines
    assert "extension fastbert._C: disabled by FASTBERT_NO_EXT=1" in lines


def test_serve_answers_embed(runs):
    without, with_ = torch.tensor(runs["without"]["embed"]), torch.tensor(runs["with"]["embed"])
    assert without.shape == (2, 32)
    assert (without - with_).abs().max().item() <= FP32_TOLERANCE
