"""The pretraining corpus: plain text in, tokenized BERT examples out, with HF datasets doing the work.

Input format (the original BERT one): one sentence or line per line, a blank line between documents.
`load_dataset("text", sample_by="paragraph")` yields one row per document; a multi-process `map`
tokenizes each document's lines once into a memory-mapped, cached Arrow table; a second `map` builds
the examples:
- with NSP, sentence pairs as BERT's create_pretraining_data.py does: chunks of whole sentences up to a
  target length (10% of them shorter), split at a random sentence into A and B; B is the true
  continuation (label 0) or a span of another document (label 1) on a fair coin (where BERT's script
  forces a random B for a one-sentence chunk, a true pair here splits that sentence in two, which
  keeps the labels 50/50 on short documents); the pair is truncated to fit by dropping tokens from
  the front or back of the longer side at random;
- without NSP, whole sentences of one document packed up to the maximum length.
Every random choice is drawn from a generator seeded by (seed, document index), so the examples do
not depend on the number of map processes and the cache is reused across runs and ranks.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

NOT_NEXT, IS_NEXT = 1, 0  # transformers' next_sentence_label convention: 0 = B continues A


@dataclass(frozen=True)
class CorpusOptions:
    max_seq_length: int = 128
    nsp: bool = True
    with_offsets: bool = False  # character offsets, for whole-word masking
    seed: int = 0
    short_seq_prob: float = 0.1
    num_proc: int | None = None
    cache_dir: str | None = None


def _map_processes(requested: int | None, rows: int) -> int | None:
    workers = requested if requested is not None else min(4, os.cpu_count() or 1)
    return workers if workers > 1 and rows >= 8 * workers else None


def load_documents(files: list[str], cache_dir: str | None = None):
    """One row per document ({"text": ...}), empty documents dropped."""
    from datasets import load_dataset

    documents = load_dataset("text", data_files=list(files), sample_by="paragraph", split="train", cache_dir=cache_dir)
    return documents.filter(lambda row: bool(row["text"].strip()))


class TokenizeDocuments:
    """Batched map: document text -> "sentences" (token ids per line) and, optionally, "offsets".

    Offsets are shifted by each line's start within the document, so concatenated lines never look
    like one word to whole-word masking (a gap of at least one character separates them).
    """

    def __init__(self, tokenizer, with_offsets: bool):
        self.tokenizer = tokenizer
        self.with_offsets = with_offsets

    def __call__(self, batch: dict) -> dict:
        out = {"sentences": [], "offsets": []}
        for text in batch["text"]:
            lines = [line.strip() for line in text.split("\n") if line.strip()]
            encoded = self.tokenizer(lines, add_special_tokens=False, return_offsets_mapping=self.with_offsets)
            kept = [i for i, ids in enumerate(encoded["input_ids"]) if ids]  # lines with no tokens are skipped
            out["sentences"].append([encoded["input_ids"][i] for i in kept])
            if self.with_offsets:
                starts = _line_starts(lines)
                out["offsets"].append(
                    [[[s + starts[i], e + starts[i]] for s, e in encoded["offset_mapping"][i]] for i in kept]
                )
        if not self.with_offsets:
            del out["offsets"]
        return out


def _line_starts(lines: list[str]) -> list[int]:
    starts, position = [], 0
    for line in lines:
        starts.append(position)
        position += len(line) + 1
    return starts


class Segment:
    """A run of tokens (and their offsets, or None) that can be grown and trimmed at both ends."""

    def __init__(self):
        self.ids: list[int] = []
        self.offsets: list | None = []

    def extend(self, ids: list[int], offsets: list | None) -> None:
        self.ids += ids
        self.offsets = None if offsets is None else self.offsets + offsets

    def __len__(self) -> int:
        return len(self.ids)

    def drop(self, front: bool) -> None:
        self.ids = self.ids[1:] if front else self.ids[:-1]
        if self.offsets is not None:
            self.offsets = self.offsets[1:] if front else self.offsets[:-1]


class BuildExamples:
    """Batched map with indices: tokenized documents -> BERT examples (NSP pairs or packed MLM sequences)."""

    def __init__(self, documents, tokenizer, options: CorpusOptions):
        if options.nsp and len(documents) < 2:
            raise ValueError("next-sentence prediction needs at least two documents (separate them by a blank line)")
        self.documents = documents  # the tokenized dataset, for the random B segments
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.options = options

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        examples = []
        offsets_column = batch.get("offsets") or [None] * len(indices)
        for index, sentences, offsets in zip(indices, batch["sentences"], offsets_column):
            rng = random.Random(self.options.seed * 1_000_003 + index)
            document = list(zip(sentences, offsets or [None] * len(sentences)))
            build = self._pairs if self.options.nsp else self._packed
            examples += build(document, index, rng)
        columns = ["input_ids", "token_type_ids", "special_tokens_mask"]
        columns += ["next_sentence_label"] * self.options.nsp + ["offset_mapping"] * self.options.with_offsets
        return {name: [example[name] for example in examples] for name in columns}

    # --- NSP pairs ---------------------------------------------------------------------------------
    def _pairs(self, document: list, index: int, rng: random.Random) -> list[dict]:
        max_tokens = self.options.max_seq_length - 3  # [CLS] A [SEP] B [SEP]
        target = max_tokens
        if rng.random() < self.options.short_seq_prob:
            target = rng.randint(2, max_tokens)
        examples, chunk, length, i = [], [], 0, 0
        while i < len(document):
            chunk.append(document[i])
            length += len(document[i][0])
            if i == len(document) - 1 or length >= target:
                is_next = rng.random() < 0.5
                if is_next and len(chunk) == 1:
                    chunk = _split_in_two(chunk[0], rng)  # a true pair from one sentence: its two halves
                is_next = is_next and len(chunk) > 1  # a one-token sentence cannot be split
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) > 1 else 1
                a = _concat(chunk[:a_end])
                if is_next:
                    b = _concat(chunk[a_end:])
                else:
                    b = self._random_segment(index, max(1, target - len(a)), rng)
                    i -= len(chunk) - a_end  # the unused sentences start the next chunk
                _truncate_pair(a, b, max_tokens, rng)
                examples.append(self._pair_example(a, b, IS_NEXT if is_next else NOT_NEXT))
                chunk, length = [], 0
            i += 1
        return examples

    def _random_segment(self, index: int, target: int, rng: random.Random) -> Segment:
        other = rng.randrange(len(self.documents) - 1)
        other += other >= index  # any document but this one
        row = self.documents[other]
        sentences = row["sentences"]
        offsets = row.get("offsets") or [None] * len(sentences)
        start = rng.randrange(len(sentences))
        return _concat(list(zip(sentences, offsets))[start:], stop_at=target)

    def _pair_example(self, a: Segment, b: Segment, label: int) -> dict:
        example = self._example([self.cls, *a.ids, self.sep, *b.ids, self.sep], len(a) + 2, [a, b])
        example["next_sentence_label"] = label
        return example

    # --- MLM only: whole sentences packed to the maximum length -------------------------------------
    def _packed(self, document: list, index: int, rng: random.Random) -> list[dict]:
        max_tokens = self.options.max_seq_length - 2  # [CLS] ... [SEP]
        pieces = [piece for sentence in document for piece in _split(sentence, max_tokens)]
        examples, current = [], Segment()
        for ids, offsets in pieces:
            if len(current) + len(ids) > max_tokens:
                examples.append(self._example([self.cls, *current.ids, self.sep], len(current) + 2, [current]))
                current = Segment()
            current.extend(ids, offsets)
        if len(current):
            examples.append(self._example([self.cls, *current.ids, self.sep], len(current) + 2, [current]))
        return examples

    def _example(self, input_ids: list[int], first_length: int, segments: list[Segment]) -> dict:
        special = {0, first_length - 1, len(input_ids) - 1}
        example = {
            "input_ids": input_ids,
            "token_type_ids": [0] * first_length + [1] * (len(input_ids) - first_length),
            "special_tokens_mask": [int(position in special) for position in range(len(input_ids))],
        }
        if self.options.with_offsets:
            none = [[0, 0]]
            example["offset_mapping"] = none + [o for segment in segments for o in segment.offsets + none]
        return example


def _concat(sentences: list, stop_at: int | None = None) -> Segment:
    segment = Segment()
    for ids, offsets in sentences:
        segment.extend(ids, offsets)
        if stop_at is not None and len(segment) >= stop_at:
            break
    return segment


def _split(sentence: tuple, size: int) -> list[tuple]:
    ids, offsets = sentence
    return [(ids[s:s + size], None if offsets is None else offsets[s:s + size]) for s in range(0, len(ids), size)]


def _split_in_two(sentence: tuple, rng: random.Random) -> list[tuple]:
    ids, offsets = sentence
    if len(ids) < 2:
        return [sentence]
    cut = rng.randint(1, len(ids) - 1)
    return [(ids[:cut], offsets and offsets[:cut]), (ids[cut:], offsets and offsets[cut:])]


def _truncate_pair(a: Segment, b: Segment, max_tokens: int, rng: random.Random) -> None:
    """BERT's truncate_seq_pair: trim the longer side, from its front or back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        longer.drop(front=rng.random() < 0.5)


def build_pretraining_dataset(files: list[str], tokenizer, options: CorpusOptions):
    """Tokenized, cached BERT pretraining examples from plain-text files (see the module docstring)."""
    documents = load_documents(files, options.cache_dir)
    tokenized = documents.map(
        TokenizeDocuments(tokenizer, options.with_offsets), batched=True, remove_columns=["text"],
        num_proc=_map_processes(options.num_proc, len(documents)), desc="tokenizing",
    )
    tokenized = tokenized.filter(lambda row: len(row["sentences"]) > 0)
    examples = tokenized.map(
        BuildExamples(tokenized, tokenizer, options), batched=True, with_indices=True,
        remove_columns=tokenized.column_names, num_proc=_map_processes(options.num_proc, len(tokenized)),
        desc="building NSP pairs" if options.nsp else "packing sequences",
    )
    # the collator seeds each batch's masks from its example ids (see fastbert.pretrain.collator)
    return examples.map(_number_examples, batched=True, with_indices=True, desc="numbering")


def _number_examples(batch: dict, indices: list[int]) -> dict:
    return {"example_id": indices}
