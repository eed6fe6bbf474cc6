"""linear: the reference and the packed oneDNN implementation against float64, and the packed-weight cache."""
import copy
import importlib
import math
import pickle

import pytest
import torch
from torch import nn

import fastbert
from fastbert.cpu import onednn_linear
from fastbert.registry import Signature
from tests.helpers import assert_close_to_ref, gelu_formula

linear_op = importlib.import_module("fastbert.ops.linear")  # the module (fastbert.ops.linear is also the function)

needs_onednn = pytest.mark.skipif(onednn_linear.mkldnn_problem() is not None,
                                  reason=str(onednn_linear.mkldnn_problem()))
ACTIVATIONS = [None, "gelu", "gelu_tanh"]
SHAPES = [(1, 8, 8), (7, 33, 65), (2, 5, 64, 96), (128, 768, 2304)]  # (*leading, in, out)


def linear64(x, weight, bias, activation):
    """activation(x W^T + b) written out in float64, independent of F.linear and F.gelu."""
    return linear_formula(x.double(), weight.double(), None if bias is None else bias.double(), activation)


def linear_formula(x, weight, bias, activation):
    """activation(x W^T + b) written out in x's dtype, independent of F.linear and F.gelu."""
    y = x @ weight.T + (0 if bias is None else bias)
    return y if activation is None else gelu_formula(y, {"gelu": "none", "gelu_tanh": "tanh"}[activation])


def random_problem(shape, with_bias=True):
    *leading, fan_in, fan_out = shape
    x = torch.randn(*leading, fan_in)
    weight = torch.randn(fan_out, fan_in) / math.sqrt(fan_in)
    bias = torch.randn(fan_out) if with_bias else None
    return x, weight, bias


@pytest.fixture(autouse=True)
def packing_on():
    onednn_linear.set_packing(True)
    yield
    onednn_linear.set_packing(True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_matches_float64_formula(activation, dtype):
    x, weight, bias = (t.to(dtype) for t in random_problem((3, 9, 17, 11)))
    expected = linear64(x, weight, bias, activation)
    got = linear_op.linear_ref(x, weight, bias, activation)
    assert got.dtype == dtype
    # The baseline is the formula in the same dtype, never linear_ref itself (F.linear + F.gelu).
    assert_close_to_ref(got, linear_formula(x, weight, bias, activation), expected, name="linear_ref")


@needs_onednn
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_matches_float64(activation, shape, with_bias):
    x, weight, bias = random_problem(shape, with_bias)
    with torch.no_grad():
        fast = onednn_linear.linear_onednn(x, weight, bias, activation)
        same_dtype = linear_op.linear_ref(x, weight, bias, activation)
    assert_close_to_ref(fast, same_dtype, linear64(x, weight, bias, activation))


@needs_onednn
def test_onednn_takes_non_contiguous_and_empty_inputs():
    x, weight, bias = random_problem((40, 24, 16))
    strided = x.t().contiguous().t()
    with torch.no_grad():
        assert_close_to_ref(onednn_linear.linear_onednn(strided, weight, bias), linear_op.linear_ref(x, weight, bias),
                            linear64(x, weight, bias, None))
        assert onednn_linear.linear_onednn(x[:0], weight, bias).shape == (0, 16)


@needs_onednn
def test_auto_picks_onednn_for_fp32_cpu_inference_only():
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert linear_op.linear_implementation(x, layer.weight, layer.bias) is onednn_linear.linear_onednn
    assert linear_op.linear_implementation(x, layer.weight, layer.bias) is linear_op.linear_ref  # grad enabled
    assert linear_op.linear_implementation(x.double(), layer.weight.double()) is linear_op.linear_ref
    with fastbert.use_backend("torch"), torch.no_grad():
        assert linear_op.linear_implementation(x, layer.weight, layer.bias) is linear_op.linear_ref


def test_grad_enabled_path_is_the_reference_with_gradients():
    x, weight, bias = (t.requires_grad_() for t in random_problem((6, 12, 10)))
    y = linear_op.linear(x, weight, bias, activation="gelu")
    y.sum().backward()
    assert x.grad is not None and weight.grad is not None and bias.grad is not None
    torch.testing.assert_close(y, linear_op.linear_ref(x, weight, bias, "gelu"), rtol=0, atol=0)


def test_explicit_onednn_refuses_autograd():
    signature = Signature("linear", "cpu", torch.float32, grad=True)
    assert "backward" in fastbert.backend.REGISTRY.get("linear", "onednn").problem(signature)


def test_entry_point_checks_arguments():
    x, weight, bias = random_problem((3, 8, 4))
    with pytest.raises(ValueError, match="activation"):
        linear_op.linear(x, weight, bias, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        linear_op.linear(x, weight.t(), bias)
    with pytest.raises(ValueError, match="bias"):
        linear_op.linear(x, weight, bias[:2])


@needs_onednn
def test_cache_reuses_and_repacks_on_in_place_change():
    x, weight, bias = random_problem((5, 16, 8))
    with torch.no_grad():
        first = onednn_linear.packed_weight(weight)
        assert onednn_linear.packed_weight(weight) is first
        weight.mul_(-2.0)  # bumps the version counter
        assert onednn_linear.packed_weight(weight) is not first
        assert_close_to_ref(onednn_linear.linear_onednn(x, weight, bias), linear_op.linear_ref(x, weight, bias),
                            linear64(x, weight, bias, None))


@needs_onednn
def test_cache_follows_replaced_parameters_and_load_state_dict():
    layer, other = nn.Linear(16, 8), nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad():
        onednn_linear.linear_onednn(x, layer.weight, layer.bias)
        layer.load_state_dict(other.state_dict())  # copy_ into the same parameters
        torch.testing.assert_close(onednn_linear.linear_onednn(x, layer.weight, layer.bias), other(x))
        layer.weight = nn.Parameter(torch.randn(8, 16))  # a new parameter object
        torch.testing.assert_close(onednn_linear.linear_onednn(x, layer.weight, layer.bias),
                                   nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.randn(8, 16)  # new storage behind the same parameter
        torch.testing.assert_close(onednn_linear.linear_onednn(x, layer.weight, layer.bias),
                                   nn.functional.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_packed_weights_stay_out_of_state_dict_deepcopy_and_pickle():
    layer = nn.Linear(64, 32)
    before = pickle.dumps(layer)
    with torch.no_grad():
        onednn_linear.linear_onednn(torch.randn(2, 64), layer.weight, layer.bias)
    assert onednn_linear.cache_bytes() >= 64 * 32 * 4
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert vars(layer).keys() == vars(nn.Linear(64, 32)).keys()
    assert len(pickle.dumps(layer)) == len(before)
    twin = copy.deepcopy(layer)
    assert onednn_linear.packed_weight(twin.weight) is not onednn_linear.packed_weight(layer.weight)


@needs_onednn
def test_cache_entry_dies_with_its_weight():
    onednn_linear.clear_cache()
    weight = torch.randn(32, 16)
    onednn_linear.packed_weight(weight)
    assert onednn_linear.cache_bytes() == 32 * 16 * 4
    del weight
    assert onednn_linear.cache_bytes() == 0


@needs_onednn
def test_switching_packing_off_frees_the_cache_and_falls_back():
    layer, x = nn.Linear(16, 8), torch.randn(4, 16)
    with torch.no_grad():
        onednn_linear.linear_onednn(x, layer.weight, layer.bias)
        onednn_linear.set_packing(False)
        assert onednn_linear.cache_bytes() == 0
        assert linear_op.linear_implementation(x, layer.weight) is linear_op.linear_ref
        assert "switched off" in fastbert.backend.REGISTRY.get("linear", "onednn").problem(
            Signature("linear", "cpu", torch.float32))


def test_missing_private_ops_fall_back_silently_and_info_says_why(monkeypatch):
    monkeypatch.setattr(onednn_linear, "_REQUIRED_OPS", ("_no_such_op_for_fastbert",))
    fastbert.backend.REGISTRY.clear_cache()
    try:
        assert "_no_such_op_for_fastbert" in onednn_linear.problem("cpu")
        assert "_no_such_op_for_fastbert" in fastbert.available_backends()["onednn"]
        layer, x = nn.Linear(16, 8), torch.randn(4, 16)
        with torch.no_grad():
            assert linear_op.linear_implementation(x, layer.weight, layer.bias) is linear_op.linear_ref
    finally:
        fastbert.backend.REGISTRY.clear_cache()


@needs_onednn
@pytest.mark.parametrize("arch", ["bert-base", "roberta-base", "distilbert-base", "electra-base", "albert-base"])
def test_patched_families_run_packed_gemms_and_match_transformers(arch):
    import transformers

    from fastbert.bench.workloads import make_workload
    from fastbert.presets import preset_config

    config = preset_config(arch, hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                           vocab_size=200, max_position_embeddings=40)
    config._attn_implementation = "sdpa"
    reference = transformers.AutoModel.from_config(config).eval()
    model = transformers.AutoModel.from_config(config).eval()
    model.load_state_dict(reference.state_dict())
    fastbert.patch(model)
    work = make_workload(config, 3, 24, "uniform", torch.device("cpu"), seed=1)
    onednn_linear.clear_cache()
    with torch.inference_mode():
        expected = reference(**work.inputs).last_hidden_state[work.keep]
        got = model(**work.inputs).last_hidden_state[work.keep]
    assert onednn_linear.cache_bytes() > 0  # the packed path ran
    assert (got - expected).abs().max().item() <= 1e-4


def test_training_mode_forward_under_no_grad_keeps_the_autograd_path():
    # Reentrant gradient checkpointing runs a training model's first forward under no_grad: it must
    # take the implementations of the recomputation (no packed weights, no inference-only kernels).
    model = fastbert.BertModel(transformers_config()).train()
    ids = torch.randint(1, 100, (2, 12))
    onednn_linear.clear_cache()
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids))
    assert onednn_linear.cache_bytes() == 0
    with torch.no_grad():
        assert not fastbert.backend.records_autograd()
        with fastbert.backend.training_forward():
            assert fastbert.backend.records_autograd()
        model.eval()(ids, attention_mask=torch.ones_like(ids))
    assert onednn_linear.cache_bytes() > 0  # eval under no_grad does pack


def transformers_config():
    import transformers

    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
