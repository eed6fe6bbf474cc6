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
