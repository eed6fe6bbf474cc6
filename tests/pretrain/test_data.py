"""NSP pairs and packed MLM sequences from the corpus, checked against the documents re-tokenized here."""
from __future__ import annotations

import pytest

from fastbert.pretrain.data import CorpusOptions, build_pretraining_dataset


@pytest.fixture(scope="module")
def documents(tokenizer, corpus) -> list[list[int]]:
    """Each document of the corpus as one token stream (its lines tokenized and concatenated)."""
    paragraphs = [p for p in open(corpus).read().split("\n\n") if p.strip()]
    lines = [[line for line in p.splitlines() if line.strip()] for p in paragraphs]
    return [[t for ids in tokenizer(doc, add_special_tokens=False)["input_ids"] for t in ids] for doc in lines]


def where(documents, tokens: list[int]) -> set[int]:
    """The documents holding `tokens` as a contiguous run."""
    needle = "," + ",".join(map(str, tokens)) + ","
    return {i for i, doc in enumerate(documents) if needle in "," + ",".join(map(str, doc)) + ","}


def split_pair(example, tokenizer):
    ids = example["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    first_sep = ids.index(tokenizer.sep_token_id)
    a, b = ids[1:first_sep], ids[first_sep + 1:-1]
    assert example["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert example["special_tokens_mask"] == [1] + [0] * len(a) + [1] + [0] * len(b) + [1]
    return a, b


def nsp_examples(tokenizer, corpus, cache_dir, max_seq_length, seeds):
    return [example for seed in seeds for example in build_pretraining_dataset(
        [corpus], tokenizer, CorpusOptions(max_seq_length=max_seq_length, seed=seed, num_proc=1, cache_dir=cache_dir))]


def test_nsp_labels_are_a_fair_coin(tokenizer, corpus, cache_dir):
    labels = [e["next_sentence_label"] for e in nsp_examples(tokenizer, corpus, cache_dir, 32, range(16))]
    n = len(labels)
    assert n > 800
    # 4 standard deviations of a fair coin's fraction
    assert abs(sum(labels) / n - 0.5) <= 4 * (0.25 / n) ** 0.5, (sum(labels), n)


def test_true_pairs_are_adjacent_in_one_document(tokenizer, corpus, cache_dir, documents):
    """No truncation at 512: a true B starts right where A ends; a random B comes from another document."""
    examples = nsp_examples(tokenizer, corpus, cache_dir, 512, range(2))
    counts = {0: 0, 1: 0}
    for example in examples:
        a, b = split_pair(example, tokenizer)
        assert a and b
        counts[example["next_sentence_label"]] += 1
        if example["next_sentence_label"] == 0:
            assert where(documents, a + b), "a true pair is not contiguous text of one document"
        else:
            assert any(da != db for da in where(documents, a) for db in where(documents, b)), "B from A's document"
    assert min(counts.values()) > 20


def test_truncated_pairs_fit_and_keep_order(tokenizer, corpus, cache_dir, documents):
    examples = nsp_examples(tokenizer, corpus, cache_dir, 32, [0])
    assert max(len(e["input_ids"]) for e in examples) <= 32
    for example in examples:
        a, b = split_pair(example, tokenizer)
        in_a, in_b = where(documents, a), where(documents, b)
        assert in_a and in_b, "truncation must cut only at the ends of A and B"
        if example["next_sentence_label"] == 0:
            assert in_a & in_b


def test_mlm_only_packs_whole_documents_in_order(tokenizer, corpus, cache_dir, documents):
    examples = build_pretraining_dataset(
        [corpus], tokenizer, CorpusOptions(max_seq_length=48, nsp=False, num_proc=1, cache_dir=cache_dir))
    assert "next_sentence_label" not in examples.column_names
    rebuilt: list[int] = []
    for example in examples:
        assert len(example["input_ids"]) <= 48 and example["special_tokens_mask"][0] == 1
        rebuilt += example["input_ids"][1:-1]
    assert rebuilt == [t for doc in documents for t in doc], "every token once, in order"


def test_examples_do_not_depend_on_the_number_of_processes(tokenizer, corpus, tmp_path):
    def build(num_proc):
        options = CorpusOptions(max_seq_length=64, num_proc=num_proc, cache_dir=str(tmp_path / str(num_proc)))
        return build_pretraining_dataset([corpus], tokenizer, options)["input_ids"]

    assert build(1) == build(2)
