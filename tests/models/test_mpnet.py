"""MPNet (all-mpnet-base-v2's architecture) on the fast encoder: the relative-position bias through the
encoder's relative hook (fastbert/models/relative.py), against transformers on fresh random inputs.

Sequences up to 290 tokens, so the distances pass MPNet's max_distance (128) and every bucket is read.
transformers runs right-padded (or unpadded) batches; fastbert also runs them left-padded and must give
the same numbers on the real tokens (its positions come from input_ids, its distances from packed tokens).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import fastbert
from fastbert.models.families import family_of_model_type
from fastbert.models.relative import MPNET_BUCKETS, MPNET_RELATIVE
from fastbert.ops.relative_attention import pair_buckets
from fastbert.patch import is_patched
from tests.dropin._common import assert_grads_close, loss_and_grads
from tests.helpers import int8_gate, max_error
from tests.models.family_configs import family_batch, family_config

TOL = 1e-5
FAMILY = family_of_model_type("mpnet")
LENGTHS = [290, 7, 150, 1, 40, 200]  # six: two questions of three choices for ForMultipleChoice
SEQLEN = 290
SUFFIXES = ("Model", *FAMILY.heads)


def mpnet_config(**overrides):
    return family_config("mpnet", max_position_embeddings=SEQLEN + 2, **overrides)


def models(suffix: str, patched: bool, config=None):
    """(transformers model, fastbert model: native or patched) with the same random weights, eval mode."""
    config = config or mpnet_config()
    torch.manual_seed(0)
    reference = getattr(transformers, "MPNet" + suffix)(config).eval()
    fast = getattr(transformers if patched else fastbert, "MPNet" + suffix)(config).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fastbert.patch(fast) if patched else fast


def batches(config, suffix: str, seed: int, lengths=LENGTHS, seqlen=SEQLEN) -> tuple[dict, dict]:
    """(right-padded, the same rows left-padded); each (2, 3, seq) for ForMultipleChoice."""
    right = family_batch(config, lengths, seqlen, "right", torch.Generator().manual_seed(seed))
    left = {key: torch.stack([row.roll(seqlen - n) for row, n in zip(value, lengths)]) for key, value in right.items()}
    if suffix == "ForMultipleChoice":
        right, left = ({key: value.view(2, 3, seqlen) for key, value in b.items()} for b in (right, left))
    return right, left


def run(model, batch, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must not fall back here
        return model(**batch, **kwargs)


def assert_outputs_match(out, ref, keep_out, keep_ref, tol=TOL):
    """Every tensor field; per-token fields compared on real tokens (fastbert keeps zeros at padding)."""
    compared = 0
    for name, theirs in ref.items():
        mine = out[name]
        if isinstance(theirs, tuple):  # hidden_states
            assert len(mine) == len(theirs)
            for a, b in zip(mine, theirs):
                assert max_error(a[keep_out], b[keep_ref]) <= tol, name
            compared += 1
            continue
        if not torch.is_tensor(theirs):
            continue
        per_token = theirs.dim() >= 2 and theirs.shape[:2] == keep_ref.shape
        assert max_error(mine[keep_out] if per_token else mine, theirs[keep_ref] if per_token else theirs) <= tol, name
        compared += 1
    assert compared, "no output compared"


def _keep(batch):
    mask = batch["attention_mask"]
    return mask.view(-1, mask.shape[-1]).bool()


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("patched", [False, True], ids=["native", "patch"])
def test_every_head_matches_transformers_left_right_and_unpadded(suffix, patched):
    reference, fast = models(suffix, patched)
    right, left = batches(reference.config, suffix, seed=len(suffix) + patched)
    kwargs = {"output_hidden_states": True} if suffix == "Model" else {}
    ref = run(reference, right, **kwargs)
    for batch in (right, left):  # heads reading [:, 0] get the first real token: left padding equals right
        assert_outputs_match(run(fast, batch, **kwargs), ref, _keep(batch), _keep(right))
    unpadded, _ = batches(reference.config, suffix, seed=5, lengths=[64] * 6, seqlen=64)
    unpadded.pop("attention_mask")  # the dense layout: no gather, cu_seqlens = arange
    full = torch.ones(6, 64, dtype=torch.bool)
    assert_outputs_match(run(fast, unpadded, **kwargs), run(reference, unpadded, **kwargs), full, full)


def test_bucket_index_is_transformers_bitwise():
    """index[i - j + L - 1] is the bucket transformers' compute_position_bias reads for query i, key j."""
    reference, _ = models("Model", patched=False)
    for length in (1, 2, 17, 129, SEQLEN):
        layout = fastbert.models.encoder.TokenLayout(1, length, None, None, length)
        index, table = MPNET_RELATIVE.prepare(reference, layout)
        position = torch.arange(length)
        theirs = reference.encoder.relative_position_bucket(position[None, :] - position[:, None],
                                                            num_buckets=MPNET_BUCKETS)
        assert torch.equal(pair_buckets(index, length, length), theirs)
        bias = reference.encoder.compute_position_bias(torch.zeros(1, length, 1))
        assert torch.equal(table.expand(length, -1, -1)[0, :, pair_buckets(index, length, length)], bias[0])
    assert int(index.max()) == MPNET_BUCKETS - 1  # 290 tokens reach the last bucket


@pytest.mark.parametrize("suffix", ["ForMaskedLM", "ForSequenceClassification"])
def test_training_step_every_gradient_matches(suffix):
    reference, fast = models(suffix, patched=False)
    reference.train()
    fast.train()
    batch, _ = batches(reference.config, suffix, seed=17)
    if suffix == "ForMaskedLM":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor([0, 1, 1, 0, 1, 0])
    loss, grads = loss_and_grads(fast, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert max_error(loss, ref_loss) <= TOL
    assert len(ref_grads) == len([p for p in reference.parameters() if p.requires_grad])
    assert grads["mpnet.encoder.relative_attention_bias.weight"].abs().sum() > 0
    assert_grads_close(grads, ref_grads)


def test_training_with_dropout_runs_and_differs_per_step():
    _, fast = models("Model", patched=False, config=mpnet_config(hidden_dropout_prob=0.1,
                                                                  attention_probs_dropout_prob=0.1))
    fast.train()
    batch, _ = batches(fast.config, "Model", seed=3)
    keep = _keep(batch)
    first, second = (fast(**batch).last_hidden_state[keep] for _ in range(2))
    assert torch.isfinite(first).all() and not torch.equal(first, second)
    first.square().mean().backward()
    assert fast.encoder.relative_attention_bias.weight.grad.abs().sum() > 0


def _cosines(a, b):
    return nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_bf16_is_close_to_fp32():
    reference, fast = models("Model", patched=False)
    batch, _ = batches(reference.config, "Model", seed=29)
    keep = _keep(batch)
    want = run(reference, batch).last_hidden_state[keep]
    with torch.no_grad():
        transformers_bf16 = copy.deepcopy(reference).bfloat16()(**batch).last_hidden_state[keep]
    got = run(fast.bfloat16(), batch).last_hidden_state[keep]
    assert got.dtype == torch.bfloat16
    cosines, theirs = _cosines(got, want), _cosines(transformers_bf16, want)
    assert cosines.min() >= 0.999 and cosines.mean() >= 0.9995, (cosines.min(), theirs.min())
    assert cosines.min() >= theirs.min() - 1e-3


def _assert_runs_transformers_forward(fast, reference, batch, reason):
    """fast(**batch) warns (matching `reason`) and matches the reference's last_hidden_state on real tokens."""
    with pytest.warns(UserWarning, match=reason):
        with torch.no_grad():
            out = fast(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert max_error(out[keep], run(reference, batch).last_hidden_state[keep]) <= TOL


def test_a_mask_with_holes_runs_transformers_forward_with_a_warning():
    reference, fast = models("Model", patched=True)
    batch, _ = batches(reference.config, "Model", seed=31, lengths=[20, 12], seqlen=20)
    batch["attention_mask"][0, 5:8] = 0  # padding between tokens: packing would shorten the distances
    _assert_runs_transformers_forward(fast, reference, batch, "holes")


def test_a_relative_bias_of_another_class_runs_transformers_forward():
    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return 2 * super().forward(ids)

    reference, fast = models("Model", patched=True)
    for model in (reference, fast):
        table = model.encoder.relative_attention_bias
        model.encoder.relative_attention_bias = ScaledEmbedding(*table.weight.shape, _weight=table.weight)
    batch, _ = batches(reference.config, "Model", seed=37, lengths=[30, 12], seqlen=30)
    _assert_runs_transformers_forward(fast, reference, batch, "encoder.relative_attention_bias")


def test_output_hidden_states_reads_as_a_flag_as_mpnet_does():
    """MPNet's forward has no capture_outputs: any truthy output_hidden_states gives every state."""
    reference, fast = models("Model", patched=False)
    batch, _ = batches(reference.config, "Model", seed=41, lengths=[9, 4], seqlen=9)
    keep = _keep(batch)
    for selection in ([1], -1, 0, []):
        out, ref = run(fast, batch, output_hidden_states=selection), run(reference, batch,
                                                                           output_hidden_states=selection)
        assert (out.hidden_states is None) == (ref.hidden_states is None)
        for a, b in zip(out.hidden_states or (), ref.hidden_states or ()):
            assert max_error(a[keep], b[keep]) <= TOL
    out, ref = run(fast, batch, return_dict=False), run(reference, batch, return_dict=False)
    assert len(out) == len(ref) == 2


def test_auto_classes_and_unpatch():
    config = mpnet_config()
    assert type(fastbert.AutoModel.from_config(config)) is fastbert.MPNetModel
    classifier = fastbert.AutoModelForSequenceClassification.from_config(config)
    assert type(classifier) is fastbert.MPNetForSequenceClassification
    model = transformers.MPNetForMaskedLM(config)
    fastbert.patch(model)
    assert is_patched(model) and type(model.mpnet) is fastbert.MPNetModel
    fastbert.unpatch(model)
    assert not is_patched(model) and type(model.mpnet) is transformers.MPNetModel
    assert type(model.mpnet.encoder.layer[0]) is transformers.models.mpnet.modeling_mpnet.MPNetLayer


def _tokenizer(directory):
    words = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", *"the quick brown fox a fast encoder for every bert "
             "family with padding dog jumps over lazy relative positions count".split()]
    tokenizer = transformers.MPNetTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_sentence_transformers_on_mpnet_through_patch(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tokenizer = _tokenizer(tmp_path)
    torch.manual_seed(0)
    transformers.MPNetModel(family_config("mpnet", vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    model = st.SentenceTransformer(modules=[Transformer(str(tmp_path)), Pooling(32, pooling_mode="mean"), Normalize()],
                                   device="cpu")
    sentences = ["the quick brown fox", "a fast encoder for every bert family with padding", "dog",
                 "relative positions count the lazy dog over the fox"]
    before = model.encode(sentences, convert_to_tensor=True)
    fastbert.patch(model)
    assert any(type(m) is fastbert.MPNetModel for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        after = model.encode(sentences, convert_to_tensor=True)
    assert max_error(after, before) <= TOL


def test_quantize_with_the_accuracy_gate():
    """fastbert.quantize on MPNet's Linears, gated by the project's cosines (on a CPU without VNNI the int8
    GEMM runs its exact reference, int8_linear.problem() says why; the gate and the report are the same)."""
    from fastbert.quantize import Int8Linear, quantize

    _, model = models("Model", patched=False, config=mpnet_config(hidden_size=64, intermediate_size=128))
    unquantized = copy.deepcopy(model)
    data = [batches(model.config, "Model", seed=s, lengths=[60, 33, 12, 48], seqlen=60)[0] for s in range(4)]
    report = quantize(model, calibration=data)
    assert report.passed and report.gate == int8_gate() and report.quantized
    assert isinstance(model.get_submodule(report.quantized[0]), Int8Linear)
    assert all(".attention.attn." in name or ".intermediate." in name or ".output." in name
               for name in report.quantized + report.kept)
    for batch in data:
        keep = _keep(batch)
        with torch.no_grad():
            got, want = model(**batch).last_hidden_state, unquantized(**batch).last_hidden_state
        assert _cosines(got[keep], want[keep]).min() >= 0.98
