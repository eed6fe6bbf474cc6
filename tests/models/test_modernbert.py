"""ModernBERT native classes and fastbert.patch against transformers in fp32: every head, left and
right padding, both poolings, hidden states, a training step's gradients, and the plain-path fallbacks.

Small random-init configs: 4 layers (global, local, local, global: global_attn_every_n_layers=3), a
local window of 8 tokens (|distance| <= 4) on sequences up to 30 tokens, so windows matter. Every
parameter is drawn at random (norm weights included), so a skipped or swapped piece shows.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import ModernBertConfig

import fastbert
from fastbert.models import modernbert
from fastbert.models.native import _warned_reasons
from tests.dropin._common import assert_grads_close, loss_and_grads
from tests.helpers import max_error, padding_mask

# A fast-path test that silently ran transformers' forward would prove nothing: its warning is an error.
pytestmark = pytest.mark.filterwarnings("error:fastbert:UserWarning")

HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice")
LENGTHS = [30, 17, 9, 1]
ATOL = 1e-5  # x max(1, max |reference|): the project's fp32 rule (hidden states here reach |x| ~ 6)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, name: str = "") -> None:
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    assert max_error(ours, theirs) <= ATOL * scale, f"{name}: error {max_error(ours, theirs):.3g} (scale {scale:.3g})"


def modernbert_config(**overrides) -> ModernBertConfig:
    values = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  local_attention=8, global_attn_every_n_layers=3, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, sparse_prediction=False,
                  num_labels=3)
    values.update(overrides)
    return ModernBertConfig(**values)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.15 * torch.randn_like(parameter))
    return model


def pair(suffix: str, config: ModernBertConfig, patched: bool):
    """(transformers model, fastbert model) with the same random weights, in eval mode."""
    if suffix == "ForQuestionAnswering":
        config.num_labels = 2
    reference = randomize(getattr(transformers, "ModernBert" + suffix)(config)).eval()
    if patched:
        fast = getattr(transformers, "ModernBert" + suffix)(config).eval()
        fast.load_state_dict(reference.state_dict())
        fastbert.patch(fast)
    else:
        fast = getattr(fastbert, "ModernBert" + suffix)(config).eval()
        fast.load_state_dict(reference.state_dict())
    return reference, fast


def batch_for(suffix: str, side: str, lengths=LENGTHS, seqlen: int = 30) -> dict:
    mask = padding_mask(lengths, seqlen, side)
    ids = torch.randint(3, 100, (len(lengths), seqlen)).masked_fill(mask == 0, 0)
    if suffix == "ForMultipleChoice":  # 2 questions x 2 choices
        return dict(input_ids=ids.view(2, 2, seqlen), attention_mask=mask.view(2, 2, seqlen))
    return dict(input_ids=ids, attention_mask=mask)


def right_padded(batch: dict) -> dict:
    """The same sequences padded on the right (a left-padded batch's tokens moved to the front)."""
    mask = batch["attention_mask"]
    order = torch.argsort(1 - mask, dim=-1, stable=True)
    return {name: torch.gather(value, -1, order) for name, value in batch.items()}


def assert_outputs_match(fast_out, hf_out, mask: torch.Tensor) -> None:
    """Every output field equal within ATOL; (batch, seq, ...) ones on real tokens only."""
    keep = mask.bool().reshape(-1, mask.shape[-1])
    for name in hf_out.keys():
        ours, theirs = fast_out[name], hf_out[name]
        pairs = zip(ours, theirs) if isinstance(theirs, tuple) else [(ours, theirs)]
        for index, (a, b) in enumerate(pairs):
            assert a.shape == b.shape, name
            if a.dim() >= 2 and tuple(a.shape[:2]) == tuple(keep.shape):
                a, b = a[keep], b[keep]
            assert_close(a, b, f"{name}[{index}]")


@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("suffix", HEADS)
def test_every_head_matches_transformers(suffix, side, patched):
    reference, fast = pair(suffix, modernbert_config(), patched)
    batch = batch_for(suffix, side)
    with torch.no_grad():
        ours = fast(**batch, output_hidden_states=True)
        # transformers' cls pooling reads column 0, a padding row under left padding; fastbert pools the
        # first real token there, i.e. what transformers computes on the same sequences padded right.
        theirs_batch = right_padded(batch) if suffix == "ForSequenceClassification" else batch
        theirs = reference(**theirs_batch, output_hidden_states=True)
    if suffix == "ForSequenceClassification":
        assert_close(ours.logits, theirs.logits)
    else:
        assert_outputs_match(ours, theirs, batch["attention_mask"])
    assert isinstance(fast.model if suffix != "Model" else fast, modernbert.ModernBertModel)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("suffix", ["ForSequenceClassification", "ForMultipleChoice"])
def test_mean_pooling_and_biases(suffix, side):
    """classifier_pooling="mean", and every optional bias on (attention, MLP, norms, head)."""
    config = modernbert_config(classifier_pooling="mean", attention_bias=True, mlp_bias=True, norm_bias=True,
                               classifier_bias=True, decoder_bias=True)
    reference, fast = pair(suffix, config, patched=False)
    batch = batch_for(suffix, side)
    with torch.no_grad():
        assert_close(fast(**batch).logits, reference(**batch).logits)


def test_without_padding_inputs_embeds_and_position_ids():
    reference, fast = pair("Model", modernbert_config(), patched=False)
    ids = torch.randint(3, 100, (2, 24))
    embeds = torch.randn(2, 24, 64)
    positions = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        for arguments in (dict(input_ids=ids), dict(inputs_embeds=embeds),
                          dict(input_ids=ids, position_ids=positions),
                          dict(input_ids=ids, attention_mask=torch.ones(2, 24, dtype=torch.long))):
            assert_close(fast(**arguments)[0], reference(**arguments)[0], str(list(arguments)))


def test_return_dict_false_gives_a_tuple():
    reference, fast = pair("Model", modernbert_config(), patched=False)
    batch = batch_for("Model", "right")
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = fast(**batch, return_dict=False)
        as_dict = fast(**batch).last_hidden_state
        theirs = reference(**batch, return_dict=False)
    assert isinstance(ours, tuple) and ours[0].shape == (4, 30, 64)
    assert torch.equal(ours[0], as_dict), "the tuple's first item is not the ModelOutput's last_hidden_state"
    assert_close(ours[0][keep], theirs[0][keep], "tuple[0] vs transformers")


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_training_step_gradients_match_transformers(side, checkpointing):
    """Loss and every parameter gradient of one MLM step, within 1e-5 x max(1, |gradient|)."""
    reference, fast = pair("ForMaskedLM", modernbert_config(), patched=False)
    reference.train()
    fast.train()
    if checkpointing:
        for model in (reference, fast):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batch = batch_for("ForMaskedLM", side)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(torch.rand(labels.shape) < 0.5, -100)
    batch["labels"] = labels
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(fast, batch)
    assert_close(loss, ref_loss, "loss")
    assert_grads_close(grads, ref_grads, atol=ATOL)


def _warns_and_matches(fast, reference, arguments, match: str):
    _warned_reasons.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            ours = fast(**arguments)
    assert any(match in str(w.message) for w in caught), [str(w.message) for w in caught]
    with torch.no_grad():
        theirs = reference(**arguments)
    assert_close(ours[0], theirs[0])


def test_output_attentions_runs_transformers_forward():
    reference, fast = pair("Model", modernbert_config(), patched=False)
    batch = batch_for("Model", "right")
    _warns_and_matches(fast, reference, dict(batch, output_attentions=True), "output_attentions=True")


def test_mask_with_holes_runs_transformers_forward():
    reference, fast = pair("Model", modernbert_config(), patched=False)
    batch = batch_for("Model", "right")
    batch["attention_mask"][0, 5] = 0
    _warns_and_matches(fast, reference, batch, "holes")


def test_4d_mask_runs_transformers_forward():
    """transformers uses a 4-D mask as given on every layer (no window): the fast path must not add one."""
    reference, fast = pair("Model", modernbert_config(), patched=False)
    batch = batch_for("Model", "right")
    batch["attention_mask"] = batch["attention_mask"][:, None, None, :].bool()
    _warns_and_matches(fast, reference, batch, "4-D attention_mask")


def test_unknown_module_runs_transformers_forward():
    class Gelu2(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x) * 2

    reference, fast = pair("Model", modernbert_config(), patched=False)
    for model in (reference, fast):
        model.layers[1].mlp.act = Gelu2()
    _warns_and_matches(fast, reference, batch_for("Model", "left"), "layers.1.mlp")


def test_unknown_activation_class_known_to_transformers_runs_as_a_module():
    """An elementwise transformers activation other than GELU (silu) runs on packed tokens, exactly."""
    config = modernbert_config(hidden_activation="silu")
    reference, fast = pair("Model", config, patched=False)
    batch = batch_for("Model", "right")
    with torch.no_grad():
        assert_outputs_match(fast(**batch), reference(**batch), batch["attention_mask"])


def test_patch_and_unpatch():
    model = transformers.ModernBertForTokenClassification(modernbert_config())
    assert fastbert.patch(model) is model and fastbert.patch.__module__ == "fastbert.patch"
    from fastbert.patch import is_patched
    assert is_patched(model) and type(model.model) is modernbert.ModernBertModel
    assert all(type(layer) is modernbert.FastModernBertEncoderLayer for layer in model.model.layers)
    fastbert.unpatch(model)
    assert not is_patched(model) and type(model.model) is transformers.ModernBertModel
    assert all(type(layer) is transformers.models.modernbert.modeling_modernbert.ModernBertEncoderLayer
               for layer in model.model.layers)


def test_save_load_strict_and_auto(tmp_path):
    config = modernbert_config()
    source = randomize(transformers.ModernBertForMaskedLM(config)).eval()
    source.save_pretrained(tmp_path)
    loaded = fastbert.ModernBertForMaskedLM.from_pretrained(tmp_path).eval()
    auto = fastbert.AutoModelForMaskedLM.from_pretrained(tmp_path)
    base = fastbert.AutoModel.from_pretrained(tmp_path)  # head weights dropped quietly, as transformers does
    assert type(auto) is fastbert.ModernBertForMaskedLM and type(base) is fastbert.ModernBertModel
    batch = batch_for("ForMaskedLM", "right")
    with torch.no_grad():
        keep = batch["attention_mask"].bool()
        assert_close(loaded(**batch).logits[keep], source(**batch).logits[keep])
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)  # a new head
    assert type(model) is fastbert.ModernBertForSequenceClassification and model.config.num_labels == 3
    assert torch.equal(model.model.embeddings.tok_embeddings.weight, source.model.embeddings.tok_embeddings.weight)


def test_pickle_round_trip():
    import pickle

    model = randomize(fastbert.ModernBertModel(modernbert_config())).eval()
    batch = batch_for("Model", "left")
    with torch.no_grad():
        before = model(**batch).last_hidden_state  # fills the run-time caches, which pickling must not carry
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is fastbert.ModernBertModel
    assert type(copy.layers[0]) is modernbert.FastModernBertEncoderLayer
    assert copy.state_dict().keys() == model.state_dict().keys()
    for name, tensor in copy.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), f"{name} changed in the round trip"
    with torch.no_grad():
        assert torch.equal(copy(**batch).last_hidden_state, before)


def test_modernbert_base_preset_is_the_default_config():
    from fastbert.presets import preset_config

    config = preset_config("modernbert-base")
    default = ModernBertConfig()
    assert type(config) is ModernBertConfig
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "local_attention", "vocab_size"):
        assert getattr(config, name) == getattr(default, name)
    assert config.layer_types.count("full_attention") == 8 and len(config.layer_types) == 22
