"""The fused query/key/value weight cached for inference follows every change of the parameters: after
each change the output equals transformers' BertModel run on the model's current weights."""
import pytest
import torch
import transformers

import fastbert
from fastbert.models import plan
from tests.helpers import assert_close_to_ref, max_error, random_batch, small_config


def transformers_output(model, batch, dtype):
    """transformers' BertModel (no fused cache) on a copy of `model`'s current weights, in `dtype`."""
    reference = transformers.BertModel(model.config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        return reference.to(dtype)(**batch).last_hidden_state


def assert_matches_transformers(out, model, batch, name):
    """fp32 output within 1e-5 x max(1, |ref|) of fp64 transformers on the real tokens (measured: 5e-7)."""
    keep = batch["attention_mask"].bool()
    ref = transformers_output(model, batch, torch.float64)[keep]
    error, bound = max_error(out[keep], ref), 1e-5 * max(1.0, ref.abs().max().item())
    assert error <= bound, f"{name}: error {error:.3g} > {bound:.3g} against transformers on the current weights"


@pytest.fixture(params=[True, False], ids=["plans", "general-forward"])
def plans(request):
    """Both caches: the inference plan's (plans on) and the general forward's (plans off)."""
    plan.set_plans(request.param)
    yield request.param
    plan.set_plans(True)


def test_cache_follows_in_place_updates_and_replaced_parameters(plans):
    config = small_config()
    model = fastbert.BertModel(config).eval()
    batch = random_batch(config, 2, 6)
    value = model.encoder.layer[0].attention.self.value
    with torch.no_grad():
        first = model(**batch).last_hidden_state
        assert_matches_transformers(first, model, batch, "first")
        value.weight.mul_(2.0)  # in place: the version counter moves
        assert_matches_transformers(model(**batch).last_hidden_state, model, batch, "after an in-place update")
        value.weight = torch.nn.Parameter(value.weight / 2.0)  # a new parameter object
        assert_matches_transformers(model(**batch).last_hidden_state, model, batch, "after a replaced parameter")
        query = model.encoder.layer[1].attention.self.query
        query.bias = torch.nn.Parameter(torch.randn_like(query.bias))  # a bias too, in another layer
        assert_matches_transformers(model(**batch).last_hidden_state, model, batch, "after a replaced bias")


def test_cache_follows_a_dtype_change_of_the_parameters():
    """.to(dtype) swaps each parameter's data in place without moving its version counter: the general
    forward's cache (plans off) must see the new storage, not hand back the fused weight of the old one."""
    config = small_config()
    model = fastbert.BertModel(config).eval()
    batch = random_batch(config, 2, 6)
    keep = batch["attention_mask"].bool()
    plan.set_plans(False)
    try:
        with torch.no_grad():
            model(**batch)
            model.to(torch.bfloat16).to(torch.float32)  # the bf16-rounded weights, in fp32 again
            back = model(**batch).last_hidden_state  # the fused copy of the unrounded weights is stale
            assert_matches_transformers(back, model, batch, "back in fp32")
            model.to(torch.bfloat16)
            low = model(**batch).last_hidden_state
    finally:
        plan.set_plans(True)
    assert low.dtype == torch.bfloat16
    model.float()  # exactly the bf16 weights it ran with (fp32 holds every bf16 value)
    assert_close_to_ref(low[keep], transformers_output(model, batch, torch.bfloat16)[keep],
                        transformers_output(model, batch, torch.float64)[keep], name="bf16")
