"""The families inside the tools people use: PEFT, pipelines, sentence-transformers, attn_implementation,
save_pretrained/from_pretrained and the Auto classes; and patch() on a model of no supported family."""
import copy

import pytest
import torch
import transformers

import fastbert
from fastbert.models.families import family_of_model_type
from tests.dropin._common import assert_grads_close, loss_and_grads
from tests.helpers import max_error
from tests.models.family_configs import MODEL_TYPES, family_batch, family_config, hf_and_fast

peft = pytest.importorskip("peft")

LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"]}


def _base_name(model_type):
    return family_of_model_type(model_type).base.__name__


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_peft_lora_on_each_familys_attention_names(model_type):
    config = family_config(model_type)
    family = family_of_model_type(model_type)
    torch.manual_seed(0)
    base = getattr(transformers, family.class_prefix + "ForSequenceClassification")(config)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS.get(model_type, ["query", "value"]),
                                  lora_dropout=0.0, init_lora_weights=False, task_type="SEQ_CLS")
    torch.manual_seed(7)
    reference = peft.get_peft_model(copy.deepcopy(base), lora_config)
    torch.manual_seed(7)
    fast = fastbert.patch(peft.get_peft_model(copy.deepcopy(base), lora_config))
    batch = family_batch(config, [8, 5, 2], 8, "right", torch.Generator().manual_seed(3))
    batch["labels"] = torch.tensor([0, 1, 1])
    loss, grads = loss_and_grads(fast, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert any("lora_A" in name for name in ref_grads)
    assert max_error(loss, ref_loss) <= 1e-5
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_attn_implementation_fastbert_matches_eager(model_type):
    config = family_config(model_type)
    torch.manual_seed(0)
    reference = getattr(transformers, _base_name(model_type))(config).eval()
    reference.set_attn_implementation("eager")
    fast = copy.deepcopy(reference)
    fast.set_attn_implementation("fastbert")
    batch = family_batch(config, [7, 4], 7, "right", torch.Generator().manual_seed(5))
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        out, ref = fast(**batch).last_hidden_state, reference(**batch).last_hidden_state
    assert max_error(out[keep], ref[keep]) <= 1e-5


@pytest.mark.parametrize("config_class", ["DebertaConfig"])  # DeBERTa v1
def test_patch_of_an_unsupported_model_lists_the_supported_families(config_class):
    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64, pad_token_id=0)
    model = transformers.AutoModel.from_config(config)
    with pytest.raises(fastbert.UnsupportedModelError) as caught:
        fastbert.patch(model)
    for name in ("BERT", "RoBERTa", "XLM-RoBERTa", "CamemBERT", "ELECTRA", "DistilBERT", "ALBERT"):
        assert name in str(caught.value)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_save_pretrained_round_trip_and_auto_classes(model_type, tmp_path):
    config = family_config(model_type)
    family = family_of_model_type(model_type)
    reference, fast = hf_and_fast(family.class_prefix + "ForMaskedLM", config)
    fast.save_pretrained(tmp_path)
    batch = family_batch(config, [6, 3], 6, "right", torch.Generator().manual_seed(9))
    keep = batch["attention_mask"].bool()
    plain = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    loaded = fastbert.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is getattr(fastbert, family.class_prefix + "ForMaskedLM")
    assert type(plain) is type(reference)
    with torch.no_grad():
        ref = reference(**batch).logits[keep]
        assert max_error(plain(**batch).logits[keep], ref) == 0
        assert max_error(loaded(**batch).logits[keep], ref) <= 1e-5
    base = fastbert.AutoModel.from_pretrained(tmp_path, init_new_head=True)  # an MLM checkpoint has no pooler
    assert type(base) is getattr(fastbert, _base_name(model_type))


def _bpe_tokenizer(directory):
    """A RoBERTa-style byte-level BPE tokenizer trained here: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4."""
    from tokenizers import ByteLevelBPETokenizer

    text = ["the quick brown fox jumps over the lazy dog", "a fast encoder for every bert family",
            "padding positions start after the pad id", "sentences of different lengths"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = transformers.RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                                  pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_fill_mask_pipeline_with_a_roberta_bpe_tokenizer(tmp_path):
    tokenizer = _bpe_tokenizer(tmp_path)
    config = family_config("roberta", vocab_size=len(tokenizer))
    reference, fast = hf_and_fast("RobertaForMaskedLM", config)
    text = ["the quick brown <mask> jumps", "a <mask> encoder"]
    ref = transformers.pipeline("fill-mask", model=reference, tokenizer=tokenizer, top_k=3)(text)
    out = transformers.pipeline("fill-mask", model=fast, tokenizer=tokenizer, top_k=3)(text)
    for mine, theirs in zip(out, ref):
        assert [m["token"] for m in mine] == [t["token"] for t in theirs]
        assert max(abs(m["score"] - t["score"]) for m, t in zip(mine, theirs)) <= 1e-6


def test_sentence_transformers_on_an_xlm_roberta_config(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    tokenizer = _bpe_tokenizer(tmp_path)
    torch.manual_seed(0)
    transformers.XLMRobertaModel(family_config("xlm-roberta", vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    for pooling in ("mean", "cls"):
        model = st.SentenceTransformer(modules=[Transformer(str(tmp_path)), Pooling(32, pooling_mode=pooling)],
                                       device="cpu")
        sentences = ["the quick brown fox", "a fast encoder for every bert family with padding", "dog"]
        before = model.encode(sentences, convert_to_tensor=True)
        fastbert.patch(model)
        assert any(type(m) is fastbert.XLMRobertaModel for m in model.modules())
        after = model.encode(sentences, convert_to_tensor=True)
        assert max_error(after, before) <= 1e-5, pooling
