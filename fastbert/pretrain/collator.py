"""Batches for pretraining: transformers' DataCollatorForLanguageModeling, plus two things it lacks.

The 80/10/10 masking and whole-word masking are transformers'. Added here:
- Offsets padding. Its padding step pads input_ids, token_type_ids and special_tokens_mask but not
  offset_mapping, which whole-word masking reads, so a batch of examples of different lengths fails.
- Masks that depend only on (seed, the batch's example ids), never on how many batches came before.
  With the global RNG or one running generator, a resumed run masks differently from an uninterrupted
  one: Trainer restores the RNG state only after it has drawn the first batch after the checkpoint.
"""
from __future__ import annotations

import hashlib

import torch
from transformers import DataCollatorForLanguageModeling

NO_OFFSET = [0, 0]  # what tokenizers give special tokens
EXAMPLE_ID = "example_id"


class PretrainingCollator(DataCollatorForLanguageModeling):
    def torch_call(self, examples):
        if examples and EXAMPLE_ID in examples[0]:
            ids = [example[EXAMPLE_ID] for example in examples]
            examples = [{k: v for k, v in example.items() if k != EXAMPLE_ID} for example in examples]
            self.generator = torch.Generator().manual_seed(_batch_seed(self.seed or 0, ids))
        if examples and "offset_mapping" in examples[0]:
            examples = self._with_padded_offsets(examples)
        return super().torch_call(examples)

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


def _batch_seed(seed: int, example_ids: list[int]) -> int:
    text = f"{seed}:{','.join(map(str, example_ids))}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
