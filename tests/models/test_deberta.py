"""DeBERTa-v2/v3 against transformers: one layer's disentangled attention, then (below) whole models.

Random-init small configs shaped like deberta-v3 (log buckets, shared key/query projections,
c2p + p2c, LayerNorm'ed relative embeddings, no absolute positions, no token types), fresh random
batches, sequences longer than position_buckets so that the log buckets and the clamp count.
"""
import types
import warnings
from unittest import mock

import pytest
import torch
import transformers
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

import fastbert
from fastbert.models import deberta, encoder, native
from fastbert.ops.relative_attention import relative_attention
from fastbert.patch import is_patched
from tests.dropin._common import assert_grads_close, loss_and_grads
from tests.helpers import assert_close_to_ref, int8_gate, max_error, padding_mask
from tests.models.family_configs import family_config

TOL = 1e-5


def deberta_config(**overrides) -> transformers.DebertaV2Config:
    """deberta-v3-base's shape, small: 8 log buckets over max_relative_positions -1 (-> 64 positions)."""
    return family_config("deberta-v2", **overrides)


# ---- the buckets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buckets,max_position", [(8, 64), (256, 512), (4, 24), (-1, 64)])
@pytest.mark.parametrize("length", [1, 5, 40, 700])
def test_bucket_of_each_distance_is_transformers(buckets, max_position, length):
    """The (2L-1,) table read at i - j + L - 1 is build_relative_position's (L, L) matrix, bitwise."""
    table, low, high = deberta._bucket_table(length, buckets, max_position, torch.get_default_dtype())
    x = torch.zeros(1, length, 1)
    expected = hf.build_relative_position(x, x, bucket_size=buckets, max_position=max_position)[0]
    position = torch.arange(length)
    assert torch.equal(table[position[:, None] - position[None, :] + length - 1], expected)
    assert (low, high) == (expected.min().item(), expected.max().item())
    assert torch.equal(table, -table.flip(0))  # odd: the p2c term's -bucket(j - i) is bucket(i - j)


# ---- one layer's attention ----------------------------------------------------------------------------------


def _encoder(config, dtype):
    """A DebertaV2Encoder whose relative embeddings and their LayerNorm are random (not LayerNorm's fixed point)."""
    encoder = hf.DebertaV2Encoder(config).to(dtype)
    with torch.no_grad():
        for parameter in (encoder.rel_embeddings.weight, encoder.LayerNorm.weight, encoder.LayerNorm.bias):
            parameter.normal_()
    return encoder


def _hf_attention(module, encoder, hidden, mask):
    relative_pos = encoder.get_rel_pos(hidden)
    return module(hidden, encoder.get_attention_mask(mask), relative_pos=relative_pos,
                  rel_embeddings=encoder.get_rel_embedding())[0][mask.bool()]


def _fast_attention(module, encoder, hidden, mask):
    keep = mask.bool()
    lengths = keep.sum(-1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    packed = hidden[keep]
    heads, head_dim = module.num_attention_heads, module.attention_head_size
    projections = (module.query_proj, module.key_proj, module.value_proj)
    q, k, v = (proj(packed).view(-1, heads, head_dim) for proj in projections)
    state = deberta.prepare(types.SimpleNamespace(encoder=encoder), int(lengths.max()))
    scale = deberta.attention_scale(head_dim, hidden.dtype)
    modules = dict(attention=module, query=module.query_proj, key=module.key_proj)
    index, q_rel, k_rel = deberta.relative_terms(modules, state, q, k, scale)
    context = relative_attention(q, k, v, cu_seqlens, int(lengths.max()), index, q_rel=q_rel, k_rel=k_rel,
                                 softmax_scale=scale)
    return context.reshape(packed.shape[0], -1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("buckets", [8, -1])
def test_one_layer_matches_disentangled_self_attention(side, dtype, tol, buckets):
    config = deberta_config(position_buckets=buckets, max_relative_positions=24 if buckets < 0 else -1)
    module = hf.DisentangledSelfAttention(config).to(dtype).eval()
    encoder = _encoder(config, dtype)
    lengths, seqlen = [40, 3, 17, 1], 40  # longer than 2 * position_buckets: log buckets and clamp both reached
    mask = padding_mask(lengths, seqlen, side)
    hidden = torch.randn(len(lengths), seqlen, config.hidden_size, dtype=dtype)
    with torch.no_grad():
        expected = _hf_attention(module, encoder, hidden, mask)
        out = _fast_attention(module, encoder, hidden, mask)
    assert max_error(out, expected) <= tol


def test_one_layer_gradients_match():
    """Every parameter of the attention, the relative embeddings and their LayerNorm, through c2p and p2c."""
    config = deberta_config()
    module = hf.DisentangledSelfAttention(config).double()
    encoder = _encoder(config, torch.float64)
    lengths, seqlen = [30, 11], 30
    mask = padding_mask(lengths, seqlen, "right")
    hidden = torch.randn(2, seqlen, config.hidden_size, dtype=torch.float64)
    grads = []
    for run in (_hf_attention, _fast_attention):
        module.zero_grad()
        encoder.zero_grad()
        run(module, encoder, hidden, mask).pow(2).sum().backward()
        grads.append([p.grad for p in (*module.parameters(), *encoder.parameters()) if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) == len(list(module.parameters())) + 3
    for mine, theirs in zip(*grads):
        assert max_error(mine, theirs) <= 1e-10


# ---- whole models, native and patched -----------------------------------------------------------------------

HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice")


def _pair(name, config, patched):
    torch.manual_seed(0)
    reference = getattr(transformers, name)(config).eval()
    fast = (getattr(transformers, name) if patched else getattr(fastbert, name))(config).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, (fastbert.patch(fast) if patched else fast)


def _batch(config, lengths, seqlen, side="right", seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (len(lengths), seqlen), generator=generator)
    mask = padding_mask(lengths, seqlen, side)
    batch = dict(input_ids=ids.masked_fill(mask == 0, config.pad_token_id), attention_mask=mask)
    if config.type_vocab_size > 0:
        batch["token_type_ids"] = torch.randint(0, config.type_vocab_size, ids.shape, generator=generator)
    return batch


@pytest.fixture(autouse=True)
def fresh_warnings():
    native._warned_reasons.clear()  # each plain-path reason warns once per process: once per test here


def _run(model, batch, **kwargs):
    """model(**batch) without grad; a fastbert model must run the relative-attention op (the fast path)."""
    fast = any(isinstance(module, native.FastEncoder) for module in model.modules())
    with torch.no_grad(), warnings.catch_warnings(), mock.patch.object(
            encoder, "relative_attention", wraps=encoder.relative_attention) as spy:
        warnings.simplefilter("error")  # the fast path must not fall back here
        output = model(**batch, **kwargs)
    assert spy.called == fast, "the fast path did not run" if fast else "transformers' model ran fastbert's op"
    return output


# Lengths far apart, the longest (40) above 2 * position_buckets (16), so the log buckets and the clamp count.
LENGTHS = [40, 3, 17, 1, 29]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_base_model_matches_transformers(side, patched):
    config = deberta_config()
    reference, fast = _pair("DebertaV2Model", config, patched)
    batch = _batch(config, LENGTHS, 40, side, seed=len(side) + patched)
    keep = batch["attention_mask"].bool()
    out, ref = _run(fast, batch, output_hidden_states=True), _run(reference, batch, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    for mine, theirs in zip((*out.hidden_states, out.last_hidden_state), (*ref.hidden_states, ref.last_hidden_state)):
        assert max_error(mine[keep], theirs[keep]) <= TOL


@pytest.mark.parametrize("overrides", [
    dict(),  # no padding at all: the dense layout
    dict(position_buckets=-1, max_relative_positions=12),  # no log buckets: distances clamped at 12
    dict(position_biased_input=True, type_vocab_size=2, embedding_size=16),  # v2-style embeddings, embed_proj
    dict(max_relative_positions=20, position_buckets=4),
    dict(hidden_act="gelu_new"),
], ids=["dense", "no-buckets", "absolute-positions", "small-buckets", "gelu-new"])
def test_config_variants_match_transformers(overrides):
    config = deberta_config(**overrides)
    reference, fast = _pair("DebertaV2Model", config, patched=False)
    lengths = [33, 33] if not overrides else LENGTHS
    batch = _batch(config, lengths, 33 if not overrides else 40, seed=5)
    keep = batch["attention_mask"].bool()
    assert max_error(_run(fast, batch).last_hidden_state[keep], _run(reference, batch).last_hidden_state[keep]) <= TOL


def test_longer_than_max_position_embeddings_runs_as_in_transformers():
    """Without absolute positions DeBERTa-v3 has no length limit (relative buckets clamp); nor has fastbert."""
    config = deberta_config(max_position_embeddings=24)
    reference, fast = _pair("DebertaV2Model", config, patched=False)
    batch = _batch(config, [70, 31], 70, seed=6)
    keep = batch["attention_mask"].bool()
    assert max_error(_run(fast, batch).last_hidden_state[keep], _run(reference, batch).last_hidden_state[keep]) <= TOL


def test_token_type_ids_without_token_types_are_ignored_as_in_transformers():
    """DeBERTa-v3's tokenizer returns token_type_ids (1 on a pair's second text) although type_vocab_size is 0."""
    config = deberta_config()
    reference, fast = _pair("DebertaV2ForSequenceClassification", config, patched=True)
    batch = _batch(config, [9, 6], 9, seed=7)
    batch["token_type_ids"] = torch.ones_like(batch["input_ids"])
    assert max_error(_run(fast, batch).logits, _run(reference, batch).logits) <= TOL


def _head_batch(config, suffix, side, seed):
    batch = _batch(config, [24, 6, 3, 24, 1, 13], 24, side, seed)
    if suffix == "ForMultipleChoice":
        return {key: value.view(2, 3, 24) for key, value in batch.items()}
    return batch


@pytest.mark.parametrize("suffix", HEADS)
@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_every_head_matches_transformers(suffix, patched):
    config = deberta_config()
    reference, fast = _pair("DebertaV2" + suffix, config, patched)
    batch = _head_batch(config, suffix, "right", seed=11)
    keep = batch["attention_mask"].view(-1, 24).bool()
    out, ref = _run(fast, batch), _run(reference, batch)
    compared = 0
    for name, theirs in ref.items():
        if torch.is_tensor(theirs) and theirs.dim() > 0:
            per_token = theirs.dim() >= 2 and theirs.shape[:2] == keep.shape
            mine = out[name]
            assert max_error(mine[keep] if per_token else mine, theirs[keep] if per_token else theirs) <= TOL, name
            compared += 1
    assert compared


@pytest.mark.parametrize("suffix", ["ForSequenceClassification", "ForMultipleChoice"])
@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_context_pooler_reads_the_first_real_token_under_left_padding(suffix, patched):
    """ContextPooler reads [:, 0]: transformers reads a padding row under left padding, fastbert [CLS], so
    fastbert's left-padded logits are transformers' right-padded ones (relative positions: shift-free)."""
    config = deberta_config()
    reference, fast = _pair("DebertaV2" + suffix, config, patched)
    right = _head_batch(config, suffix, "right", seed=13)
    flat = {key: value.view(-1, 24) for key, value in right.items()}
    lengths = flat["attention_mask"].sum(-1).tolist()
    left = {key: torch.stack([row.roll(24 - n) for row, n in zip(value, lengths)]).view(right[key].shape)
            for key, value in flat.items()}
    assert max_error(_run(fast, left).logits, _run(reference, right).logits) <= TOL


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_training_step_every_gradient_matches(checkpointing):
    config = deberta_config()
    reference, fast = _pair("DebertaV2ForMaskedLM", config, patched=False)
    # transformers' DeBERTa fails under reentrant checkpointing (the first layer's backward frees the graph
    # of the rel_embeddings every layer shares): fastbert's is compared with its step without checkpointing.
    for model in (reference, fast) if checkpointing != "reentrant" else (fast,):
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    for model in (reference, fast):
        model.train()
    batch = _batch(config, LENGTHS, 40, seed=17)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with mock.patch.object(encoder, "relative_attention", wraps=encoder.relative_attention) as spy:
        loss, grads = loss_and_grads(fast, batch)
    assert spy.call_count == config.num_hidden_layers * (2 if checkpointing else 1)  # recomputed in backward
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert max_error(loss, ref_loss) <= TOL
    assert len(ref_grads) == len(list(reference.parameters()))
    assert ref_grads["deberta.encoder.rel_embeddings.weight"].abs().sum() > 0
    assert_grads_close(grads, ref_grads)


def test_inputs_embeds_and_return_dict_false_match_transformers():
    config = deberta_config()
    reference, fast = _pair("DebertaV2Model", config, patched=False)
    batch = _batch(config, [19, 7], 19, seed=19)
    embeds = reference.get_input_embeddings()(batch.pop("input_ids"))
    keep = batch["attention_mask"].bool()
    out = _run(fast, dict(batch, inputs_embeds=embeds), return_dict=False)
    ref = _run(reference, dict(batch, inputs_embeds=embeds), return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert max_error(out[0][keep], ref[0][keep]) <= TOL


# ---- what the fast path does not cover: transformers' forward, with one warning naming why -------------------


def _assert_runs_transformers_forward(fast, reference, inputs, reason):
    """fast(**inputs) warns (matching `reason`) and gives exactly the reference's last_hidden_state."""
    with torch.no_grad(), pytest.warns(UserWarning, match=reason):
        out = fast(**inputs).last_hidden_state
    with torch.no_grad():
        assert torch.equal(out, reference(**inputs).last_hidden_state)


@pytest.mark.parametrize("overrides,reason", [
    (dict(conv_kernel_size=3), "convolution layer"),
    (dict(share_att_key=False), "share_att_key=False"),
    (dict(relative_attention=False), "relative"),
    (dict(pos_att_type=["c2p"]), "pos_att_type"),
], ids=["conv", "separate-pos-projections", "no-relative-attention", "c2p-only"])
def test_configs_outside_the_fast_path_run_transformers_forward(overrides, reason):
    config = deberta_config(**overrides)
    reference, fast = _pair("DebertaV2Model", config, patched=True)
    _assert_runs_transformers_forward(fast, reference, _batch(config, [12, 5], 12, seed=23), reason)


def test_4d_mask_and_mask_with_holes_run_transformers_forward():
    config = deberta_config()
    reference, fast = _pair("DebertaV2Model", config, patched=False)
    batch = _batch(config, [12, 5], 12, seed=29)
    holes = dict(batch, attention_mask=batch["attention_mask"].clone())
    holes["attention_mask"][0, 4] = 0
    four_d = dict(batch, attention_mask=batch["attention_mask"].bool()[:, None, None, :])
    for inputs, reason in ((four_d, "4-D attention_mask"), (holes, "holes")):
        _assert_runs_transformers_forward(fast, reference, inputs, reason)


def test_output_attentions_and_swapped_modules_run_transformers_forward():
    config = deberta_config()
    reference, fast = _pair("DebertaV2Model", config, patched=False)
    batch = _batch(config, [12, 5], 12, seed=31)
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions"):
        assert len(fast(**batch, output_attentions=True).attentions) == config.num_hidden_layers

    class Scaled(torch.nn.LayerNorm):
        pass

    norm = fast.encoder.layer[1].output.LayerNorm
    fast.encoder.layer[1].output.LayerNorm = Scaled(norm.normalized_shape, eps=norm.eps)
    reference.encoder.layer[1].output.LayerNorm = Scaled(norm.normalized_shape, eps=norm.eps)
    _assert_runs_transformers_forward(fast, reference, batch, "encoder.layer.1.output.LayerNorm")


# ---- classes, patch, loading --------------------------------------------------------------------------------


def test_patch_unpatch_auto_and_save_load(tmp_path):
    config = deberta_config()
    model = transformers.DebertaV2ForSequenceClassification(config).eval()
    fastbert.patch(model)
    assert is_patched(model) and type(model.deberta).__module__ == "fastbert.models.native"
    fastbert.unpatch(model)
    assert type(model.deberta) is hf.DebertaV2Model and not is_patched(model)
    model.save_pretrained(tmp_path)
    loaded = fastbert.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is fastbert.DebertaV2ForSequenceClassification
    assert type(fastbert.AutoModel.from_config(config)) is fastbert.DebertaV2Model
    batch = _batch(config, [10, 4], 10, seed=37)
    assert max_error(_run(loaded, batch).logits, _run(model, batch).logits) <= TOL


# ---- reduced precision ---------------------------------------------------------------------------------------


def test_bf16_runs_within_the_dtype_rule():
    """bf16 fastbert vs float64 transformers: no further than transformers' own bf16 forward, by the rule."""
    config = deberta_config()
    reference, fast = _pair("DebertaV2Model", config, patched=False)
    batch = _batch(config, LENGTHS, 40, seed=41)
    keep = batch["attention_mask"].bool()
    ref64 = _run(reference.double(), batch).last_hidden_state[keep]
    same = _run(reference.to(torch.bfloat16), batch).last_hidden_state[keep]
    out = _run(fast.to(torch.bfloat16), batch).last_hidden_state[keep]
    assert out.dtype == torch.bfloat16
    assert_close_to_ref(out, same, ref64, name="bf16 last_hidden_state")


def test_quantize_keeps_its_gate_and_the_fast_path_runs_the_int8_modules():
    """fastbert.quantize on a patched DeBERTa: the report meets its gate, and the fast forward (which calls
    the Int8Linear query/key modules for the relative terms too) equals transformers' forward on them."""
    from fastbert.quantize import quantize

    config = deberta_config()
    torch.manual_seed(43)
    model = fastbert.patch(transformers.DebertaV2Model(config).eval())
    calibration = [_batch(config, [24, 9, 17, 2], 24, seed=seed) for seed in range(4)]
    report = quantize(model, calibration=calibration)
    minimum_mean, minimum = int8_gate()
    assert report.mean_cosine >= minimum_mean and report.min_cosine >= minimum
    assert report.quantized, "the gate kept every Linear: nothing int8 ran"
    batch = _batch(config, LENGTHS, 40, seed=47)
    keep = batch["attention_mask"].bool()
    out = _run(model, batch).last_hidden_state[keep]
    fastbert.unpatch(model)
    assert max_error(out, _run(model, batch).last_hidden_state[keep]) <= TOL


def test_cached_position_tables_follow_every_parameter_they_read():
    """Inference keeps each layer's projected pos_key/pos_query; an in-place update of key_proj, query_proj,
    rel_embeddings or their LayerNorm, or a replaced parameter, is seen on the next forward."""
    config = deberta_config()
    reference, fast = _pair("DebertaV2Model", config, patched=True)
    batch = _batch(config, LENGTHS, 40, seed=53)
    keep = batch["attention_mask"].bool()
    updates = [
        lambda m: m.encoder.layer[0].attention.self.key_proj.weight.add_(0.1),
        lambda m: m.encoder.layer[1].attention.self.query_proj.bias.add_(0.1),
        lambda m: m.encoder.rel_embeddings.weight.mul_(2.0),
        lambda m: m.encoder.LayerNorm.weight.add_(0.5),
        lambda m: setattr(m.encoder.LayerNorm, "bias", torch.nn.Parameter(m.encoder.LayerNorm.bias + 0.3)),
    ]
    for update in [None, *updates]:
        if update is not None:
            with torch.no_grad():
                update(fast)
                update(reference)
        out, ref = _run(fast, batch).last_hidden_state, _run(reference, batch).last_hidden_state
        assert max_error(out[keep], ref[keep]) <= TOL


def test_linear_wrappers_on_key_and_query_run_for_the_position_terms_too():
    """A LoRA-like wrapper on key_proj/query_proj is called on the relative embeddings as transformers calls it."""

    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.25

    config = deberta_config()
    reference, fast = _pair("DebertaV2Model", config, patched=False)
    for model in (reference, fast):
        for layer in model.encoder.layer:
            for name in ("key_proj", "query_proj"):
                old = getattr(layer.attention.self, name)
                wrapped = Shifted(old.in_features, old.out_features)
                wrapped.load_state_dict(old.state_dict())
                setattr(layer.attention.self, name, wrapped)
    batch = _batch(config, LENGTHS, 40, seed=59)
    keep = batch["attention_mask"].bool()
    assert max_error(_run(fast, batch).last_hidden_state[keep], _run(reference, batch).last_hidden_state[keep]) <= TOL


@pytest.mark.parametrize("shape", [(2, 0), (0, 5), (0, 0)])
def test_empty_batch_or_sequence_returns_empty_output(shape):
    model = fastbert.DebertaV2Model(deberta_config()).eval()
    ids = torch.zeros(shape, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert out.last_hidden_state.shape == (*shape, 32) and len(out.hidden_states) == 3
