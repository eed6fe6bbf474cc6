"""Masking statistics of the pretraining batches (transformers' collator, fed by fastbert's examples)."""
from __future__ import annotations

import pytest
import torch

from fastbert.pretrain.collator import PretrainingCollator
from fastbert.pretrain.data import CorpusOptions, build_pretraining_dataset


@pytest.fixture(scope="module")
def examples(tokenizer, corpus, cache_dir):
    options = CorpusOptions(max_seq_length=64, with_offsets=True, num_proc=1, cache_dir=cache_dir)
    return list(build_pretraining_dataset([corpus], tokenizer, options))


def batches(examples, collator, passes: int, size: int = 16):
    """Batches over the examples, `passes` times, each pass with other batch compositions (other masks)."""
    for p in range(passes):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(p)).tolist()
        for start in range(0, len(order), size):
            chosen = [examples[i] for i in order[start:start + size]]
            yield chosen, collator([{k: v for k, v in e.items() if k != "offset_mapping"} for e in chosen])


def test_masking_rates_over_many_tokens(tokenizer, examples):
    """15% of real tokens selected; of those 80% [MASK], 10% random, 10% unchanged; specials never touched."""
    collator = PretrainingCollator(tokenizer, seed=0)
    counts = dict(real=0, selected=0, masked=0, unchanged=0, random=0)
    for chosen, batch in batches(examples, collator, passes=45):
        width = batch["input_ids"].shape[1]
        original = torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (width - len(e["input_ids"]))
                                 for e in chosen])
        special = torch.tensor([e["special_tokens_mask"] + [1] * (width - len(e["input_ids"])) for e in chosen]).bool()
        selected = batch["labels"] != -100
        assert not (selected & special).any(), "a special or padding token was selected"
        assert torch.equal(batch["input_ids"][special], original[special]), "a special or padding token changed"
        assert torch.equal(batch["labels"][selected], original[selected])
        inputs = batch["input_ids"][selected]
        counts["real"] += int((~special).sum())
        counts["selected"] += int(selected.sum())
        counts["masked"] += int((inputs == tokenizer.mask_token_id).sum())
        counts["unchanged"] += int((inputs == original[selected]).sum())
        counts["random"] += int(((inputs != tokenizer.mask_token_id) & (inputs != original[selected])).sum())
    assert counts["real"] > 100_000
    selected = counts["selected"]
    # tolerances: about 5 standard deviations of each binomial fraction
    assert abs(selected / counts["real"] - 0.15) < 0.006, counts
    assert abs(counts["masked"] / selected - 0.8) < 0.015, counts
    assert abs(counts["random"] / selected - 0.1) < 0.012, counts
    assert abs(counts["unchanged"] / selected - 0.1) < 0.012, counts


@pytest.mark.filterwarnings("ignore:Random token replacement is not supported")
def test_whole_word_masking_on_batches_of_mixed_lengths(tokenizer, examples):
    """Every piece of a word is selected with it; offsets of examples of different lengths are padded."""
    collator = PretrainingCollator(tokenizer, whole_word_mask=True, seed=0)
    words_selected = words = mixed = 0
    for p in range(3):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(p)).tolist()
        for start in range(0, len(order), 16):
            chosen = [examples[i] for i in order[start:start + 16]]
            mixed += len({len(e["input_ids"]) for e in chosen}) > 1
            batch = collator(chosen)
            selected = (batch["labels"] != -100)
            for row, example in zip(selected, chosen):
                pieces = tokenizer.convert_ids_to_tokens(example["input_ids"])
                for i, piece in enumerate(pieces):
                    if piece.startswith("##"):
                        assert row[i] == row[i - 1], f"word piece {piece} masked apart from its word"
                    elif not example["special_tokens_mask"][i]:
                        words += 1
                        words_selected += int(row[i])
            assert (batch["input_ids"][selected] == tokenizer.mask_token_id).all()  # transformers: all [MASK]
    assert mixed > 3
    assert abs(words_selected / words - 0.15) < 0.03


def test_masks_depend_only_on_the_seed_and_the_batch(tokenizer, examples):
    """What makes a resumed run mask as the uninterrupted one did."""
    chosen = examples[:8]
    first = PretrainingCollator(tokenizer, seed=3)
    second = PretrainingCollator(tokenizer, seed=3)
    other_batch = first([{k: v for k, v in e.items() if k != "offset_mapping"} for e in examples[8:16]])
    strip = [{k: v for k, v in e.items() if k != "offset_mapping"} for e in chosen]
    a, b = first(strip), second(strip)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(PretrainingCollator(tokenizer, seed=4)(strip)["labels"], a["labels"])
    assert other_batch["labels"].shape[0] == 8


def without_offsets(examples):
    return [{k: v for k, v in e.items() if k != "offset_mapping"} for e in examples]


def test_masks_do_not_depend_on_earlier_batches_or_worker_processes(tokenizer, examples):
    """The generator is fastbert's, seeded per batch: no state runs across batches or DataLoader workers."""
    data = without_offsets(examples[:32])
    fresh = PretrainingCollator(tokenizer, seed=5)(data[24:32])
    used = PretrainingCollator(tokenizer, seed=5)
    for start in range(0, 24, 8):
        used(data[start:start + 8])
    after_others = used(data[24:32])
    assert torch.equal(fresh["input_ids"], after_others["input_ids"])
    assert torch.equal(fresh["labels"], after_others["labels"])
    in_process, in_workers = (list(torch.utils.data.DataLoader(data, batch_size=8, num_workers=workers,
                                                                collate_fn=PretrainingCollator(tokenizer, seed=5)))
                              for workers in (0, 2))
    for a, b in zip(in_process, in_workers, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(in_process[-1]["labels"], fresh["labels"])


def test_examples_without_ids_are_masked_by_their_tokens(tokenizer, examples):
    data = [{k: v for k, v in e.items() if k in ("input_ids", "special_tokens_mask")} for e in examples[:8]]
    a, b = PretrainingCollator(tokenizer, seed=1)(data), PretrainingCollator(tokenizer, seed=1)(data)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    other_tokens = PretrainingCollator(tokenizer, seed=1)(data[1:] + data[:1])
    assert not torch.equal(other_tokens["labels"], torch.cat([a["labels"][1:], a["labels"][:1]]))
    assert (a["labels"] != -100).any()


def word_starts_reference(offsets, special) -> list[list[int]]:
    """Per token, the position where its word starts (0 for special tokens), one token at a time."""
    rows = []
    for row in range(special.shape[0]):
        starts, start = [], 0
        for i in range(special.shape[1]):
            touches = i > 0 and not special[row, i - 1] and offsets[row, i, 0] == offsets[row, i - 1, 1]
            start = 0 if special[row, i] else (start if touches else i)
            starts.append(start)
        rows.append(starts)
    return rows


def test_words_of_whole_word_masking_match_a_loop_reference():
    """Random offsets: tokens that touch the previous one, gaps, special tokens anywhere."""
    from fastbert.pretrain.collator import _words

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 4, (6, 40), generator=generator)
    gaps = torch.randint(0, 2, (6, 40), generator=generator)  # 0: the token continues the previous one
    ends = torch.cumsum(lengths + gaps, dim=1)
    offsets = torch.stack([ends - lengths, ends], dim=-1)
    special = torch.rand(6, 40, generator=generator) < 0.1
    word_start, start_of_word = _words(offsets, special)
    expected = torch.tensor(word_starts_reference(offsets, special))
    assert torch.equal(start_of_word, expected)
    positions = torch.arange(40).expand(6, 40)
    assert torch.equal(word_start, (expected == positions) & ~special)
    assert 0 < int(word_start.sum()) < int((~special).sum())  # some words have several pieces


@pytest.mark.parametrize("options, named", [(dict(mlm=False), "mlm"), (dict(return_tensors="np"), "return_tensors")])
def test_options_it_cannot_honour_are_errors(tokenizer, options, named):
    with pytest.raises(ValueError, match=named):
        PretrainingCollator(tokenizer, **options)
