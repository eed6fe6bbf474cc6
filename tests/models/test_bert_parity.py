"""fastbert's models against transformers': same weights, same outputs on real tokens."""
import copy

import pytest
import torch
import transformers

import fastbert
from tests.helpers import assert_close_to_ref, max_error, multiple_choice_batch, random_batch, small_config

HEADS = [
    ("BertModel", {}),
    ("BertForPreTraining", {}),
    ("BertForMaskedLM", {}),
    ("BertForNextSentencePrediction", {}),
    ("BertForSequenceClassification", {}),
    ("BertForTokenClassification", {}),
    ("BertForQuestionAnswering", {}),
]


def twin_models(name, config, seed=0):
    """A transformers model and the fastbert model of the same class holding the same weights."""
    torch.manual_seed(seed)
    reference = getattr(transformers, name)(config).eval()
    fast = getattr(fastbert, name)(config).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def output_tensors(output):
    """The tensor fields of a ModelOutput, by name (hidden_states tuples flattened)."""
    fields = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            fields[key] = value
        elif isinstance(value, tuple):
            fields.update({f"{key}.{i}": v for i, v in enumerate(value)})
    return fields


def assert_equal_on_real_tokens(ref_out, fast_out, mask, atol):
    ref_fields, fast_fields = output_tensors(ref_out), output_tensors(fast_out)
    assert ref_fields.keys() == fast_fields.keys()
    keep = mask.bool()
    for key, ref in ref_fields.items():
        fast = fast_fields[key]
        assert fast.shape == ref.shape, key
        # Per-token outputs are compared on real tokens only: padding rows are zeros in fastbert.
        if ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(mask.shape):
            ref, fast = ref[keep], fast[keep]
        err = max_error(fast, ref)
        assert err <= atol, f"{key}: max abs diff {err:.3g} > {atol}"


@pytest.mark.parametrize("name,extra", HEADS)
@pytest.mark.parametrize("padding", ["none", "right", "mixed"])
def test_every_head_matches_transformers_fp32(name, extra, padding):
    config = small_config()
    reference, fast = twin_models(name, config)
    g = torch.Generator().manual_seed(1)
    lengths = {"none": [12, 12, 12], "right": [12, 5, 1], "mixed": [3, 12, 7]}[padding]
    batch = random_batch(config, 3, 12, lengths=lengths, generator=g)
    with torch.no_grad():
        ref_out = reference(**batch, output_hidden_states=True)
        fast_out = fast(**batch, output_hidden_states=True)
    assert_equal_on_real_tokens(ref_out, fast_out, batch["attention_mask"], atol=1e-5)


def test_multiple_choice_matches_transformers():
    config = small_config()
    reference, fast = twin_models("BertForMultipleChoice", config)
    batch, labels = multiple_choice_batch(config)
    with torch.no_grad():
        ref_out, fast_out = reference(**batch, labels=labels), fast(**batch, labels=labels)
    assert max_error(fast_out.logits, ref_out.logits) <= 1e-5
    assert max_error(fast_out.loss, ref_out.loss) <= 1e-5


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize(
    "shape", [dict(hidden_size=96, num_attention_heads=3), dict(hidden_size=128, num_attention_heads=2)]
)
def test_activations_and_head_dims(hidden_act, shape):
    config = small_config(hidden_act=hidden_act, **shape)  # head_dim 32 and 64
    reference, fast = twin_models("BertModel", config)
    batch = random_batch(config, 4, 16, lengths=[16, 9, 1, 13])
    with torch.no_grad():
        assert_equal_on_real_tokens(reference(**batch), fast(**batch), batch["attention_mask"], atol=1e-5)


def test_left_padding_positions_and_tokens_match():
    """Positions are column indices as in transformers, so left-padded tokens match it exactly."""
    config = small_config()
    reference, fast = twin_models("BertModel", config)
    batch = random_batch(config, 3, 10, lengths=[10, 6, 3], side="left")
    with torch.no_grad():
        ref, out = reference(**batch), fast(**batch)
    keep = batch["attention_mask"].bool()
    assert max_error(out.last_hidden_state[keep], ref.last_hidden_state[keep]) <= 1e-5
    assert torch.equal(out.last_hidden_state[~keep], torch.zeros_like(out.last_hidden_state[~keep]))


def test_inputs_embeds_position_ids_bool_and_4d_masks():
    config = small_config()
    reference, fast = twin_models("BertModel", config)
    batch = random_batch(config, 2, 8, lengths=[8, 5])
    embeds = torch.randn(2, 8, config.hidden_size)
    position_ids = torch.arange(8).flip(0)[None]
    mask = batch["attention_mask"]
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = reference(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state
        for fast_mask in (mask, mask.bool(), additive, mask.bool()[:, None, None, :]):
            out = fast(inputs_embeds=embeds, attention_mask=fast_mask, position_ids=position_ids).last_hidden_state
            assert max_error(out[mask.bool()], ref[mask.bool()]) <= 1e-5


def test_return_dict_false_gives_tuples():
    config = small_config()
    reference, fast = twin_models("BertForSequenceClassification", config)
    batch = random_batch(config, 2, 6)
    with torch.no_grad():
        ref, out = reference(**batch, return_dict=False), fast(**batch, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert max_error(out[0], ref[0]) <= 1e-5


def test_output_attentions_runs_the_plain_path_with_one_warning():
    config = small_config()
    reference, fast = twin_models("BertModel", config)
    reference.set_attn_implementation("eager")
    fast.set_attn_implementation("eager")
    batch = random_batch(config, 2, 6, lengths=[6, 3])
    fastbert.models.native._warned_reasons.clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions=True is not on the fast path"):
        out = fast(**batch, output_attentions=True)
    ref = reference(**batch, output_attentions=True)
    assert len(out.attentions) == config.num_hidden_layers
    for a, b in zip(out.attentions, ref.attentions):
        assert max_error(a, b) <= 1e-6


def test_bf16_error_is_at_most_twice_transformers_own():
    config = small_config(hidden_size=128, num_attention_heads=4, intermediate_size=256)
    reference, fast = twin_models("BertModel", config)
    exact = transformers.BertModel(config).eval()
    exact.load_state_dict(reference.state_dict())
    exact = exact.double()
    batch = random_batch(config, 4, 24, lengths=[24, 17, 5, 11])
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        truth = exact(**batch).last_hidden_state[keep]
        hf_bf16 = reference.bfloat16()(**batch).last_hidden_state[keep]
        fast_bf16 = fast.bfloat16()(**batch).last_hidden_state[keep]
    assert max_error(fast_bf16, truth) <= 2 * max_error(hf_bf16, truth)


@pytest.mark.parametrize("padding_ratio", [0.0, 0.25, 0.5, 0.9])
def test_padded_batch_equals_each_sequence_alone(padding_ratio):
    """A sequence's outputs do not depend on how much padding its batch carries."""
    config = small_config()
    _, fast = twin_models("BertModel", config)
    seqlen = 20
    real = max(1, round(seqlen * (1 - padding_ratio)))
    lengths = [real, max(1, real // 2), 1]
    batch = random_batch(config, 3, seqlen, lengths=lengths)
    with torch.no_grad():
        padded = fast(**batch).last_hidden_state
        for row, length in enumerate(lengths):
            alone = fast(
                input_ids=batch["input_ids"][row : row + 1, :length],
                token_type_ids=batch["token_type_ids"][row : row + 1, :length],
            ).last_hidden_state
            assert max_error(padded[row, :length], alone[0]) <= 1e-5


def test_sequence_length_one():
    config = small_config()
    reference, fast = twin_models("BertModel", config)
    batch = random_batch(config, 2, 1, lengths=[1, 1])
    with torch.no_grad():
        assert max_error(fast(**batch).last_hidden_state, reference(**batch).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dtypes_without_compiled_kernels_run_under_auto(dtype):
    """fp64 and fp16 have no cpp kernels: "auto" must fall back to torch for them, not raise, and be as
    accurate as transformers in that dtype: the tolerance rule against transformers in fp64 on the same
    (rounded) weights, atol ATOL[dtype] (fp16 measured: error 0.003, transformers fp16 0.004)."""
    config = small_config()
    reference, fast = twin_models("BertModel", config)
    reference, fast = reference.to(dtype), fast.to(dtype)
    exact = copy.deepcopy(reference).double()  # the weights rounded to dtype, then computed in fp64
    batch = random_batch(config, 2, 8, lengths=[8, 5])
    keep = batch["attention_mask"].bool()
    with torch.no_grad(), fastbert.use_backend("auto"):
        out = fast(**batch).last_hidden_state
    with torch.no_grad():
        same_dtype, ref64 = reference(**batch).last_hidden_state, exact(**batch).last_hidden_state
    assert out.dtype == dtype
    assert_close_to_ref(out[keep], same_dtype[keep], ref64[keep], name=str(dtype))
