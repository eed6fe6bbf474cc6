"""Every family and every head against transformers: fp32 max abs diff <= 1e-5 on real tokens.

Random-init models of small configs shaped like the public checkpoints (tests/models/family_configs.py),
fresh random batches per test, right and left padding, and the RoBERTa family's positions.
"""
import warnings

import pytest
import torch

from fastbert.models.families import FAMILIES, family_of_model_type
from tests.dropin._common import assert_grads_close, grads_of, loss_and_grads
from tests.helpers import max_error, padding_mask
from tests.models.family_configs import FAIRSEQ_TYPES, MODEL_TYPES, family_batch, family_config, hf_and_fast

TOL = 1e-5
NEW_FAMILIES = [family for family in FAMILIES if family.model_type != "bert"]  # BERT has its own test files


def _run(model, batch, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must not fall back silently or loudly here
        return model(**batch, **kwargs)


def _column_positions_from_zero(mask):
    """position_ids that number a left-padded sequence's real tokens from 0, as right padding does."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_base_model_matches_transformers(model_type, side, patched):
    config = family_config(model_type)
    reference, fast = hf_and_fast(family_of_model_type(model_type).base.__name__, config, patched=patched)
    batch = family_batch(config, [9, 5, 2], 9, side, torch.Generator().manual_seed(len(model_type)))
    out = _run(fast, batch, output_hidden_states=True)
    ref = _run(reference, batch, output_hidden_states=True)
    keep = batch["attention_mask"].bool()
    assert max_error(out.last_hidden_state[keep], ref.last_hidden_state[keep]) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert max_error(mine[keep], theirs[keep]) <= TOL
    if side == "right" and getattr(ref, "pooler_output", None) is not None:
        assert max_error(out.pooler_output, ref.pooler_output) <= TOL


@pytest.mark.parametrize("model_type", FAIRSEQ_TYPES)
def test_fairseq_positions_left_padding_equals_right_padding_and_pad_id_holes(model_type):
    config = family_config(model_type)
    reference, fast = hf_and_fast(family_of_model_type(model_type).base.__name__, config)
    g = torch.Generator().manual_seed(3)
    right = family_batch(config, [8, 5, 3], 8, "right", g)
    left = {key: torch.stack([row.roll(8 - n) for row, n in zip(value, [8, 5, 3])]) for key, value in right.items()}
    assert torch.equal(left["attention_mask"], padding_mask([8, 5, 3], 8, "left"))
    ref = _run(reference, right).last_hidden_state
    out_left = _run(fast, left).last_hidden_state
    assert max_error(out_left[left["attention_mask"].bool()], ref[right["attention_mask"].bool()]) <= TOL
    # A pad id inside a sequence (attended to) keeps position padding_idx and does not advance the count.
    holes = dict(right, input_ids=right["input_ids"].clone())
    holes["input_ids"][0, 2] = holes["input_ids"][1, 1] = config.pad_token_id
    keep = holes["attention_mask"].bool()
    assert max_error(_run(fast, holes).last_hidden_state[keep], _run(reference, holes).last_hidden_state[keep]) <= TOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inputs_embeds_match_transformers(model_type):
    config = family_config(model_type)
    reference, fast = hf_and_fast(family_of_model_type(model_type).base.__name__, config)
    batch = family_batch(config, [7, 4], 7, "right", torch.Generator().manual_seed(5))
    embeds = reference.get_input_embeddings()(batch.pop("input_ids"))
    keep = batch["attention_mask"].bool()
    out = _run(fast, dict(batch, inputs_embeds=embeds)).last_hidden_state
    ref = _run(reference, dict(batch, inputs_embeds=embeds)).last_hidden_state
    assert max_error(out[keep], ref[keep]) <= TOL


def _head_cases():
    return [(family.model_type, suffix) for family in NEW_FAMILIES
            for suffix in family.heads if suffix != "ForCausalLM"]


def _head_batch(config, suffix, side, generator):
    lengths = [8, 6, 3, 8, 2, 5]
    batch = family_batch(config, lengths, 8, side, generator)
    if suffix == "ForMultipleChoice":
        return {key: value.view(2, 3, 8) for key, value in batch.items()}
    return batch


def _compare_outputs(out, ref, keep):
    """Every tensor output field; per-token fields on real tokens only."""
    compared = 0
    for name, theirs in ref.items():
        mine = out[name]
        if not torch.is_tensor(theirs) or theirs.dim() == 0:
            continue
        per_token = theirs.dim() >= 2 and theirs.shape[:2] == keep.shape
        assert max_error(mine[keep] if per_token else mine, theirs[keep] if per_token else theirs) <= TOL, name
        compared += 1
    assert compared, "no output compared"


@pytest.mark.parametrize("model_type,suffix", _head_cases())
def test_every_head_matches_transformers(model_type, suffix):
    config = family_config(model_type)
    family = family_of_model_type(model_type)
    reference, fast = hf_and_fast(family.class_prefix + suffix, config)
    batch = _head_batch(config, suffix, "right", torch.Generator().manual_seed(11))
    keep = batch["attention_mask"].view(-1, 8).bool()
    _compare_outputs(_run(fast, batch), _run(reference, batch), keep)


def _first_token_cases():
    return [(family.model_type, suffix) for family in NEW_FAMILIES for suffix in family.first_token_heads]


@pytest.mark.parametrize("model_type,suffix", _first_token_cases())
def test_heads_reading_column_0_read_the_first_real_token_under_left_padding(model_type, suffix):
    """transformers reads a padding row there; fastbert reads [CLS]/<s>: logits equal right padding's."""
    config = family_config(model_type)
    family = family_of_model_type(model_type)
    for patched in (False, True):
        reference, fast = hf_and_fast(family.class_prefix + suffix, config, patched=patched)
        right = _head_batch(config, suffix, "right", torch.Generator().manual_seed(13))
        shape = right["input_ids"].shape
        flat = {key: value.view(-1, 8) for key, value in right.items()}
        lengths = flat["attention_mask"].sum(-1).tolist()
        left = {key: torch.stack([row.roll(8 - n) for row, n in zip(value, lengths)]) for key, value in flat.items()}
        if family.first_position(config) == 0:  # column positions: number the real tokens from 0
            left["position_ids"] = _column_positions_from_zero(left["attention_mask"])  # (batch * choices, seq)
        left = {key: value if key == "position_ids" else value.view(shape) for key, value in left.items()}
        assert max_error(_run(fast, left).logits, _run(reference, right).logits) <= TOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_training_step_every_gradient_matches(model_type):
    config = family_config(model_type)
    family = family_of_model_type(model_type)
    reference, fast = hf_and_fast(family.class_prefix + "ForMaskedLM", config)
    reference.train()
    fast.train()
    batch = family_batch(config, [8, 5, 2], 8, "right", torch.Generator().manual_seed(17))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss, grads = loss_and_grads(fast, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert max_error(loss, ref_loss) <= TOL
    assert len(ref_grads) == len(list(reference.parameters()))
    assert_grads_close(grads, ref_grads)


def test_albert_shared_layers_hidden_states_per_call_and_accumulated_gradients():
    config = family_config("albert", num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
    reference, fast = hf_and_fast("AlbertModel", config)
    batch = family_batch(config, [6, 3], 6, "right", torch.Generator().manual_seed(19))
    keep = batch["attention_mask"].bool()
    out, ref = _run(fast, batch, output_hidden_states=True), _run(reference, batch, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 1 + 4 * 2
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert max_error(mine[keep], theirs[keep]) <= TOL
    for model in (fast, reference):
        model.zero_grad()
        model(**batch).last_hidden_state[keep].square().mean().backward()
    assert fast.encoder.albert_layer_groups[1].albert_layers[1].ffn.weight.grad.abs().sum() > 0
    assert_grads_close(grads_of(fast), grads_of(reference))


def test_electra_with_layer_norm_eps_zero():
    config = family_config("electra", layer_norm_eps=0.0)
    reference, fast = hf_and_fast("ElectraForPreTraining", config)
    batch = family_batch(config, [7, 3], 7, "right", torch.Generator().manual_seed(23))
    keep = batch["attention_mask"].bool()
    out, ref = _run(fast, batch).logits, _run(reference, batch).logits
    assert torch.isfinite(out[keep]).all()
    assert max_error(out[keep], ref[keep]) <= TOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_length_limit_is_the_familys(model_type):
    """The longest sequence transformers takes runs and matches; one token more is a clear error
    naming max_position_embeddings (and, for fairseq positions, where they start)."""
    config = family_config(model_type)
    reference, fast = hf_and_fast(family_of_model_type(model_type).base.__name__, config)
    offset = family_of_model_type(model_type).first_position(config)
    longest = config.max_position_embeddings - offset
    batch = family_batch(config, [longest, longest - 3], longest, "right", torch.Generator().manual_seed(6))
    keep = batch["attention_mask"].bool()
    out = _run(fast, batch).last_hidden_state
    assert max_error(out[keep], _run(reference, batch).last_hidden_state[keep]) <= TOL
    too_long = family_batch(config, [longest + 1], longest + 1, "right", torch.Generator().manual_seed(7))
    expected = f"sequence length is {longest + 1} .*max_position_embeddings={config.max_position_embeddings}"
    if offset:
        expected += f" - {offset} \\(positions start at {offset}\\)"
    with pytest.raises(ValueError, match=expected):
        fast(**too_long)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inputs_embeds_width_is_the_embedding_width(model_type):
    """inputs_embeds are as wide as the word embeddings: embedding_size for ELECTRA and ALBERT (before
    their projection), hidden_size elsewhere. Any other width is an error naming the right one."""
    config = family_config(model_type)
    _, fast = hf_and_fast(family_of_model_type(model_type).base.__name__, config)
    width = fast.get_input_embeddings().embedding_dim
    name = "embedding_size" if model_type in ("electra", "albert") else "hidden_size"
    assert (width != getattr(config, "hidden_size", getattr(config, "dim", None))) == (name == "embedding_size")
    with torch.no_grad():
        assert fast(inputs_embeds=torch.randn(2, 5, width)).last_hidden_state.shape[:2] == (2, 5)
        with pytest.raises(ValueError, match=rf"inputs_embeds must have shape \(batch, seq, {name}={width}\)"):
            fast(inputs_embeds=torch.randn(2, 5, width + 1))
