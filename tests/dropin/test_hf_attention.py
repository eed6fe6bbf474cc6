"""attn_implementation="fastbert": only the attention is fastbert's, everything else stays HF's."""
import pytest
import torch
import transformers
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import fastbert
import fastbert.hf_attention as hf_attention
from tests.dropin._common import assert_grads_close, loss_and_grads
from tests.helpers import max_error, random_batch, small_config


@pytest.fixture
def attention_calls(monkeypatch):
    """Records the keyword arguments of every fastbert.ops.attention call made by the HF function."""
    calls = []
    original = hf_attention.attention

    def recording(q, k, v, mask=None, **kwargs):
        calls.append(dict(kwargs, mask=mask, shape=tuple(q.shape)))
        return original(q, k, v, mask, **kwargs)

    monkeypatch.setattr(hf_attention, "attention", recording)
    return calls


def saved(tmp_path, name="BertForMaskedLM", config=None, seed=0):
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config or small_config())
    model.save_pretrained(tmp_path)
    return tmp_path


def test_registered_on_import():
    assert ALL_ATTENTION_FUNCTIONS["fastbert"] is hf_attention.fastbert_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["fastbert"] is hf_attention.fastbert_attention_mask


def test_mask_function_gives_a_key_padding_view():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = hf_attention.fastbert_attention_mask(2, 3, 3, mask_function=bidirectional_mask_function, attention_mask=mask)
    assert out.dtype == torch.bool and out.shape == (2, 1, 1, 3)
    assert torch.equal(out[:, 0, 0], mask.bool())
    assert hf_attention.fastbert_attention_mask(2, 3, 3, attention_mask=None) is None
    # Any other pattern (here causal) gets SDPA's full boolean mask.
    from transformers.masking_utils import causal_mask_function

    causal = hf_attention.fastbert_attention_mask(
        2, 3, 3, mask_function=causal_mask_function, attention_mask=mask.bool(), allow_is_causal_skip=False
    )
    assert causal.shape == (2, 1, 3, 3) and not causal[1, 0, 0, 1]


@pytest.mark.parametrize("name", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
def test_from_pretrained_fastbert_matches_sdpa(tmp_path, name, attention_calls):
    config = small_config()
    path = saved(tmp_path, name, config)
    fast = getattr(transformers, name).from_pretrained(path, attn_implementation="fastbert").eval()
    reference = getattr(transformers, name).from_pretrained(path, attn_implementation="sdpa").eval()
    assert fast.config._attn_implementation == "fastbert"
    batch = random_batch(config, 3, 12, lengths=[12, 5, 1])
    with torch.no_grad():
        out, ref = fast(**batch, output_hidden_states=True), reference(**batch, output_hidden_states=True)
    assert len(attention_calls) == config.num_hidden_layers
    assert all(c["mask"] is not None and c["mask"].shape == (3, 12) for c in attention_calls)
    for key in ref.keys():
        values = ref[key] if isinstance(ref[key], tuple) else (ref[key],)
        for got, want in zip(out[key] if isinstance(out[key], tuple) else (out[key],), values):
            assert max_error(got, want) <= 1e-5, key  # every position: HF's path keeps padding rows


def test_set_attn_implementation_and_the_mask_is_not_dropped(tmp_path, attention_calls):
    config = small_config()
    model = transformers.BertModel.from_pretrained(saved(tmp_path, "BertModel", config)).eval()
    model.set_attn_implementation("fastbert")
    assert model.config._attn_implementation == "fastbert"
    batch = random_batch(config, 2, 10, lengths=[10, 4])
    with torch.no_grad():
        padded = model(**batch).last_hidden_state[1, :4]
        alone = model(**{k: v[1:, :4] for k, v in batch.items()}).last_hidden_state[0]
        no_mask = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).last_hidden_state
    assert max_error(padded, alone) <= 1e-5  # the padding was masked out
    assert max_error(no_mask[1, :4], alone) > 1e-3  # and without the mask it would not be
    assert attention_calls[-1]["mask"] is None


def test_training_gradients_and_dropout(tmp_path, attention_calls):
    config = small_config()
    path = saved(tmp_path, "BertForSequenceClassification", config)
    fast = transformers.BertForSequenceClassification.from_pretrained(path, attn_implementation="fastbert").train()
    reference = transformers.BertForSequenceClassification.from_pretrained(path, attn_implementation="sdpa").train()
    batch = dict(random_batch(config, 3, 9, lengths=[9, 6, 2]), labels=torch.tensor([0, 1, 1]))
    loss, grads = loss_and_grads(fast, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert max_error(loss, ref_loss) <= 1e-5
    assert_grads_close(grads, ref_grads)
    assert all(c["dropout_p"] == 0.0 for c in attention_calls)
    fast.config.attention_probs_dropout_prob = 0.25
    for layer in fast.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.25
    fast(**batch)
    assert attention_calls[-1]["dropout_p"] == 0.25
    fast.eval()
    fast(**batch)
    assert attention_calls[-1]["dropout_p"] == 0.0


def test_decoder_and_cross_attention_fall_back_to_sdpa(tmp_path, attention_calls):
    """Causal self-attention and cross-attention are not fastbert's: SDPA runs them, same results."""
    config = small_config(is_decoder=True, add_cross_attention=True)
    path = saved(tmp_path, "BertLMHeadModel", config)
    fast = transformers.BertLMHeadModel.from_pretrained(path, attn_implementation="fastbert").eval()
    reference = transformers.BertLMHeadModel.from_pretrained(path, attn_implementation="sdpa").eval()
    batch = random_batch(config, 2, 7, lengths=[7, 5])
    encoder_states = torch.randn(2, 5, config.hidden_size)
    encoder_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        kwargs = dict(encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask, use_cache=False)
        out, ref = fast(**batch, **kwargs), reference(**batch, **kwargs)
    assert max_error(out.logits, ref.logits) <= 1e-5
    assert not attention_calls


def test_other_models_using_the_attention_interface(tmp_path, attention_calls):
    """Any model written against AttentionInterface can use the name (here RoBERTa)."""
    config = transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.RobertaModel(config).save_pretrained(tmp_path)
    fast = transformers.RobertaModel.from_pretrained(tmp_path, attn_implementation="fastbert").eval()
    reference = transformers.RobertaModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_error(out, ref) <= 1e-5
    assert len(attention_calls) == 2


def test_fastbert_models_and_patch_are_unaffected_by_the_name(tmp_path):
    """A patched model runs its own fast path whatever attn_implementation says."""
    config = small_config()
    path = saved(tmp_path, "BertModel", config)
    model = fastbert.patch(transformers.BertModel.from_pretrained(path, attn_implementation="fastbert").eval())
    reference = transformers.BertModel.from_pretrained(path).eval()
    batch = random_batch(config, 2, 6, lengths=[6, 2])
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        assert max_error(model(**batch).last_hidden_state[keep], reference(**batch).last_hidden_state[keep]) <= 1e-5
