"""Issue 12: customized modules are never silently misrun, for patch() and for the native classes.

Either the module's own code runs (embeddings of an unknown class, on the padded inputs) or the whole
forward is transformers' with one warning naming the module. Either way the outputs equal the
unpatched model's.
"""
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers.models.bert import modeling_bert as hf

import fastbert
import fastbert.models.native as native
from tests.helpers import max_error, random_batch, small_config


class EntityTypeEmbeddings(hf.BertEmbeddings):
    """Relation extraction: an entity-type embedding added in forward (types derived from the ids here)."""

    def __init__(self, config):
        super().__init__(config)
        self.entity_type_embeddings = nn.Embedding(4, config.hidden_size)

    def forward(self, input_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs) + self.entity_type_embeddings(input_ids % 4)


class ScaledOutput(hf.BertOutput):
    def forward(self, hidden_states, input_tensor):
        return 0.5 * super().forward(hidden_states, input_tensor)


class ReversedLayer(hf.BertLayer):
    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states.flip(-1), *args, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, width, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(width) + 0.5), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _customize(model: nn.Module, case: str) -> None:
    bert = model.bert if hasattr(model, "bert") else model
    config, layer = bert.config, bert.encoder.layer[1]
    torch.manual_seed(1)
    if case == "embeddings":
        custom = EntityTypeEmbeddings(config)
        custom.load_state_dict(bert.embeddings.state_dict(), strict=False)
        bert.embeddings = custom
    elif case == "output":
        layer.output.__class__ = ScaledOutput
    elif case == "layer":
        layer.__class__ = ReversedLayer
    elif case == "activation":
        layer.intermediate.intermediate_act_fn = nn.Hardshrink()  # elementwise, but not one fastbert knows
    elif case == "rmsnorm":
        layer.output.LayerNorm = RMSNorm(config.hidden_size, 1e-12)


# case -> the module the warning must name (None: the module's own code runs, no warning)
CASES = {
    "embeddings": None,
    "output": "encoder.layer.1.output",
    "layer": "encoder.layer.1",
    "activation": "encoder.layer.1.intermediate.intermediate_act_fn",
    "rmsnorm": "encoder.layer.1.output.LayerNorm",
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("way", ["patch", "native"])
def test_customized_module_gives_the_unpatched_output(case, way):
    config = small_config()
    torch.manual_seed(0)
    reference = transformers.BertForSequenceClassification(config).eval()
    _customize(reference, case)
    if way == "patch":
        fast = transformers.BertForSequenceClassification(config).eval()
        _customize(fast, case)
        fast.load_state_dict(reference.state_dict())
        fastbert.patch(fast)
    else:
        fast = fastbert.BertForSequenceClassification(config).eval()
        _customize(fast, case)
        fast.load_state_dict(reference.state_dict())
    batch = random_batch(config, 3, 9, lengths=[9, 4, 6], generator=torch.Generator().manual_seed(2))
    keep = batch["attention_mask"].bool()
    native._warned_reasons.clear()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(**batch, output_hidden_states=True)
        fast(**batch)  # a second call: still one warning
        ref = reference(**batch, output_hidden_states=True)
    messages = [str(w.message) for w in caught if "fastbert" in str(w.message)]
    assert max_error(out.hidden_states[-1][keep], ref.hidden_states[-1][keep]) <= 1e-5
    assert max_error(out.logits, ref.logits) <= 1e-5
    if CASES[case] is None:
        assert messages == []
    else:
        assert len(messages) == 1 and f"the module {CASES[case]} (" in messages[0], messages


def _twins_with_activation(name: str, config, activation: type[nn.Module]):
    """(transformers' `name`, fastbert's `name`): one set of weights, layer 0's activation an `activation()` in both."""
    torch.manual_seed(0)
    reference = getattr(transformers, name)(config).eval()
    fast = getattr(fastbert, name)(config).eval()
    fast.load_state_dict(reference.state_dict())
    for model in (reference, fast):
        model.encoder.layer[0].intermediate.intermediate_act_fn = activation()
    return reference, fast


def test_native_family_with_swapped_activation_falls_back_with_one_warning():
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=40, type_vocab_size=1)
    reference, fast = _twins_with_activation("RobertaModel", config, nn.Hardshrink)
    ids = torch.randint(3, 64, (2, 7))
    native._warned_reasons.clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="encoder.layer.0.intermediate.intermediate_act_fn"):
        out = fast(ids).last_hidden_state
    assert max_error(out, reference(ids).last_hidden_state) <= 1e-5


def test_known_activation_swap_runs_on_the_fast_path():
    """A relu swapped in for GELU is an activation fastbert knows: its own code runs, no warning."""
    config = small_config()
    reference, fast = _twins_with_activation("BertModel", config, nn.ReLU)
    batch = random_batch(config, 2, 6, lengths=[6, 3])
    keep = batch["attention_mask"].bool()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fast(**batch).last_hidden_state
    assert max_error(out[keep], reference(**batch).last_hidden_state[keep]) <= 1e-5
