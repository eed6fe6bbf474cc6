"""Batches for pretraining: transformers' DataCollatorForLanguageModeling settings, fastbert's masking.

The options and their checks (mlm_probability, mask_replace_prob, random_replace_prob, whole_word_mask,
pad_to_multiple_of, seed) are transformers'. The masking itself is done here, so that no transformers
release can change which batch gets which mask:
- Masks depend only on (seed, the batch): each batch draws from a generator seeded from the seed and the
  batch's example ids (the tokens, for examples without ids), never from a generator that runs across
  batches. With one running generator a resumed run masks differently from an uninterrupted one (Trainer
  restores the RNG state only after it has drawn the first batch after the checkpoint), and transformers
  (5.24) replaces a collator's generator on its first batch in every process.
- Offsets are padded: the tokenizer's padding pads input_ids, token_type_ids and special_tokens_mask but
  not offset_mapping, which whole-word masking reads.
The draws follow BERT: mlm_probability of the real tokens (or words) selected; of those
mask_replace_prob become [MASK], random_replace_prob a random token, the rest stay unchanged.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from transformers import DataCollatorForLanguageModeling

NO_OFFSET = [0, 0]  # what tokenizers give special tokens
EXAMPLE_ID = "example_id"
NOT_SELECTED = -100  # the label of a token that is not predicted


class PretrainingCollator(DataCollatorForLanguageModeling):
    def __post_init__(self):
        super().__post_init__()
        if not self.mlm:
            raise ValueError("PretrainingCollator masks tokens: mlm must be True, got False")
        if self.return_tensors != "pt":
            raise ValueError(f"PretrainingCollator returns torch tensors: return_tensors must be 'pt', "
                             f"got {self.return_tensors!r}")

    def torch_call(self, examples):
        examples = [example if isinstance(example, Mapping) else {"input_ids": example} for example in examples]
        example_ids = [example[EXAMPLE_ID] for example in examples] if EXAMPLE_ID in examples[0] else None
        examples = [{k: v for k, v in example.items() if k != EXAMPLE_ID} for example in examples]
        if "offset_mapping" in examples[0]:
            examples = self._with_padded_offsets(examples)
        batch = self.tokenizer.pad(examples, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of)
        special_tokens_mask = batch.pop("special_tokens_mask", None)
        offset_mapping = batch.pop("offset_mapping", None)
        generator = self.batch_generator(example_ids, batch["input_ids"])
        batch["input_ids"], batch["labels"] = self.torch_mask_tokens(
            batch["input_ids"], special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping,
            generator=generator,
        )
        return batch

    def batch_generator(self, example_ids: list[int] | None, input_ids: torch.Tensor) -> torch.Generator | None:
        """This batch's generator, from the seed and the example ids (or the tokens); None without a seed."""
        if self.seed is None:
            return None  # the global RNG, as transformers does without a seed
        key = ",".join(map(str, example_ids)) if example_ids is not None else input_ids.numpy().tobytes().hex()
        return torch.Generator().manual_seed(_batch_seed(self.seed, key))

    def torch_mask_tokens(self, inputs: torch.Tensor, special_tokens_mask=None, offset_mapping=None,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked inputs, labels): BERT's 80/10/10 on mlm_probability of the real tokens (or whole words)."""
        labels = inputs.clone()
        special = self._special_tokens(labels, special_tokens_mask)
        if self.whole_word_mask:
            if offset_mapping is None:
                raise ValueError("whole_word_mask needs offset_mapping in the examples (tokenize with "
                                 "return_offsets_mapping=True)")
            selected = _select_whole_words(torch.as_tensor(offset_mapping), special, self.mlm_probability, generator)
        else:
            probability = torch.full(labels.shape, self.mlm_probability).masked_fill_(special, 0.0)
            selected = torch.bernoulli(probability, generator=generator).bool()
        labels[~selected] = NOT_SELECTED
        replaced = _draw(labels.shape, self.mask_replace_prob, generator) & selected
        inputs[replaced] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)
        if self.random_replace_prob == 0:
            return inputs, labels
        # of the selected tokens not replaced by [MASK], the share that becomes a random token
        randomized = _draw(labels.shape, self.random_replace_prob / (1 - self.mask_replace_prob), generator)
        randomized &= selected & ~replaced
        random_tokens = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long, generator=generator)
        inputs[randomized] = random_tokens[randomized]
        return inputs, labels

    def _special_tokens(self, labels: torch.Tensor, special_tokens_mask) -> torch.Tensor:
        if special_tokens_mask is None:
            special_tokens_mask = [self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                                   for row in labels.tolist()]
        return torch.as_tensor(special_tokens_mask).bool()

    def _with_padded_offsets(self, examples: list[dict]) -> list[dict]:
        width = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padded = []
        for example in examples:
            offsets = [list(pair) for pair in example["offset_mapping"]]
            extra = [NO_OFFSET] * (width - len(offsets))
            offsets = extra + offsets if self.tokenizer.padding_side == "left" else offsets + extra
            padded.append({**example, "offset_mapping": offsets})
        return padded


def _draw(shape, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.bernoulli(torch.full(shape, probability), generator=generator).bool()


def _select_whole_words(offsets: torch.Tensor, special: torch.Tensor, probability: float,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Selects each word with `probability`, and with it every piece of the word."""
    word_start, start_of_word = _words(offsets, special)
    probability_matrix = torch.full(special.shape, probability).masked_fill_(~word_start, 0.0)
    drawn = torch.bernoulli(probability_matrix, generator=generator).bool()
    return drawn.gather(1, start_of_word) & ~special


def _words(offsets: torch.Tensor, special: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each token starts a word, the position of the start of its word; 0 for special tokens).

    A token starts a word unless it continues the previous token's text: its start offset equals the
    previous token's end, and the previous token is not special.
    """
    starts, ends = offsets[..., 0], offsets[..., 1]
    continues = torch.zeros_like(special)
    continues[:, 1:] = (starts[:, 1:] == ends[:, :-1]) & ~special[:, :-1]
    word_start = ~special & ~continues
    positions = torch.arange(special.shape[1]).expand_as(special)
    start_of_word = torch.where(word_start, positions, 0).cummax(dim=1).values
    return word_start, start_of_word.masked_fill(special, 0)


def _batch_seed(seed: int, key: str) -> int:
    text = f"{seed}:{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
