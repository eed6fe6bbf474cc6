"""The fused query/key/value weight cached for inference follows every change of the parameters."""
import torch

import fastbert
from tests.helpers import max_error, random_batch, small_config


def test_cache_follows_in_place_updates_and_replaced_parameters():
    config = small_config()
    model = fastbert.BertModel(config).eval()
    batch = random_batch(config, 2, 6)
    value = model.encoder.layer[0].attention.self.value
    with torch.no_grad():
        first = model(**batch).last_hidden_state
        value.weight.mul_(2.0)  # in place: the version counter moves
        doubled = model(**batch).last_hidden_state
        value.weight = torch.nn.Parameter(value.weight / 2.0)  # a new parameter object
        restored = model(**batch).last_hidden_state
    assert max_error(doubled, first) > 1e-3
    assert max_error(restored, first) <= 1e-6


def test_cache_follows_a_dtype_change_of_the_parameters():
    """.to(dtype) swaps each parameter's data in place without moving its version counter: the general
    forward's cache (plans off) must see the new storage, not hand back the fp32 fused weight."""
    from fastbert.models import plan

    config = small_config()
    model = fastbert.BertModel(config).eval()
    batch = random_batch(config, 2, 6)
    plan.set_plans(False)
    try:
        with torch.no_grad():
            model(**batch)
            model.to(torch.bfloat16)
            out = model(**batch).last_hidden_state
    finally:
        plan.set_plans(True)
    assert out.dtype == torch.bfloat16
