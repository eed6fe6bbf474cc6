"""--dtype auto: bf16 only on a CPU with native bf16 that oneDNN can use, and only when the model's outputs keep
a mean cosine >= 0.9999 to fp32; fp32 otherwise. The CPU is monkeypatched, so every case runs on any CPU."""
import pytest
import torch

from fastbert.serve import precision
from fastbert.serve.engine import settle_dtype
from fastbert.serve.loading import load_model
from fastbert.serve.options import ServeOptions
from tests.serve.conftest import serve

AMX = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"]
AVX512_BF16 = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
AVX2_ONLY = ["avx2"]


@pytest.fixture
def cpu(monkeypatch, pretend_machine):
    """cpu(features, onednn_problem=None): this CPU, as precision sees it."""
    def set_cpu(features, onednn_problem=None):
        pretend_machine(features)
        monkeypatch.setattr(precision, "bf16_problem", lambda: onednn_problem)
    return set_cpu


def cosine_of(value):
    calls = []

    def measure():
        calls.append(value)
        return value
    return measure, calls


@pytest.mark.parametrize("features, feature", [(AMX, "amx_bf16"), (AVX512_BF16, "avx512_bf16")])
@pytest.mark.parametrize("cosine, dtype", [(0.99995, "bf16"), (0.9998, "fp32")])
def test_native_bf16_picks_by_cosine(cpu, features, feature, cosine, dtype):
    cpu(features)
    measure, calls = cosine_of(cosine)
    choice = precision.choose_dtype("auto", measure)
    assert (choice.dtype, choice.bf16_cosine, calls) == (dtype, cosine, [cosine])
    assert (feature in choice.reason) == (dtype == "bf16")
    assert f"{cosine:.6f}" in choice.describe()


def test_avx2_only_is_fp32_without_measuring(cpu):
    cpu(AVX2_ONLY)
    measure, calls = cosine_of(1.0)
    choice = precision.choose_dtype("auto", measure)
    assert (choice.dtype, choice.bf16_cosine, calls) == ("fp32", None, [])
    assert "no native bf16" in choice.reason


def test_onednn_refusing_bf16_is_fp32(cpu):
    cpu(AMX, onednn_problem="oneDNN's bf16 GEMM needs more")
    choice = precision.choose_dtype("auto", cosine_of(1.0)[0])
    assert (choice.dtype, choice.bf16_cosine) == ("fp32", None) and "oneDNN" in choice.reason


@pytest.mark.parametrize("requested", ["fp32", "bf16", "int8"])
def test_an_explicit_dtype_is_kept(cpu, requested):
    cpu(AMX)
    measure, calls = cosine_of(0.5)
    assert (precision.choose_dtype(requested, measure).dtype, calls) == (requested, [])


def test_auto_measures_the_real_model_and_casts(cpu, embed_dir):
    cpu(AMX)
    loaded = settle_dtype(load_model(ServeOptions(embed_dir)), "auto")
    cosine = loaded.dtype_choice.bf16_cosine
    assert 0.99 < cosine <= 1.0 + 1e-6  # a real bf16 copy of a tiny random model, through the served forward
    expected = torch.bfloat16 if cosine >= precision.BF16_MIN_COSINE else torch.float32
    assert next(loaded.model.parameters()).dtype == expected


def test_info_shows_the_choice(cpu, embed_dir):
    cpu(AVX2_ONLY)
    with serve(embed_dir) as client:
        info = client.get("/info").json()
    assert (info["model_dtype"], info["dtype_choice"], info["bf16_cosine"]) == ("float32", "fp32", None)
    assert "no native bf16" in info["dtype_reason"] and info["model_id"]
