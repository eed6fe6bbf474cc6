"""Tokenization and the forward: what the batcher and the endpoints call.

An embedding model whose pooling is mean and/or cls runs fastbert.encode_packed on the batch's sequences
back to back (cu_seqlens from their lengths): no padded tensor at all, no mask to read. A sequence classifier
whose head reads only each sequence's first token (transformers' ForSequenceClassification of the BERT-table
families: fastbert.models.packed.classify_packed) runs packed too, its head on (batch, hidden). The other
pooling modes, heads classify_packed does not know and models encode_packed does not run (ModernBERT) take
the padded path: a right-padded batch the encoder unpads once before the embeddings.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastbert.models.packed import POOLING_MODES as PACKED_POOLING
from fastbert.models.packed import classify_packed, encode_packed, packed_head_problem, packed_problem, pool_packed
from fastbert.serve.loading import LoadedModel, load_tokenizer
from fastbert.serve.pooling import pool
from fastbert.serve.precision import choose_dtype

CALIBRATION_TEXTS = 64
CALIBRATION_BATCH = 16

Text = str | tuple[str, str]  # one sequence or a (first, second) pair


@dataclass(frozen=True)
class Encoded:
    """One tokenized sequence, special tokens included."""

    input_ids: list[int]
    token_type_ids: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)


class InputTooLong(ValueError):
    def __init__(self, index: int, length: int, limit: int):
        super().__init__(f"inputs[{index}] has {length} tokens; the limit is {limit} (set truncate=true to cut it)")
        self.index, self.length, self.limit = index, length, limit


class Engine:
    """The loaded model with thread-local tokenizers (a fast tokenizer mutates its truncation state on
    each call, so threads must not share one) and a batched forward."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._local = threading.local()
        self._template = load_tokenizer(loaded.tokenizer_dir)
        self.pad_id = self._template.pad_token_id if self._template.pad_token_id is not None else 0
        self.uses_token_types = "token_type_ids" in self._template.model_input_names
        self.packed = runs_packed(loaded)

    @property
    def max_input_length(self) -> int:
        return self.loaded.max_input_length

    def tokenizer(self, direction: str = "right"):
        """This thread's tokenizer truncating from `direction` ("right" or "left")."""
        cache = self._local.__dict__
        if direction not in cache:
            tokenizer = load_tokenizer(self.loaded.tokenizer_dir)
            tokenizer.truncation_side = direction
            tokenizer.model_max_length = 1 << 30  # lengths are checked here, with the numbers, not warned about
            cache[direction] = tokenizer
        return cache[direction]

    def tokenize(self, texts: list[Text], truncate: bool, direction: str = "right") -> list[Encoded]:
        """Token ids of each text or pair; InputTooLong names the first one over the limit unless truncating."""
        tokenizer = self.tokenizer(direction)
        limit = self.max_input_length
        encoded: list[Encoded | None] = [None] * len(texts)
        singles = [i for i, text in enumerate(texts) if isinstance(text, str)]
        pairs = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        for indices, args in ((singles, ([texts[i] for i in singles],)),
                              (pairs, ([texts[i][0] for i in pairs], [texts[i][1] for i in pairs]))):
            if not indices:
                continue
            out = tokenizer(*args, truncation="longest_first" if truncate else False,
                            max_length=limit if truncate else None, return_attention_mask=False,
                            return_token_type_ids=self.uses_token_types)
            types = out.get("token_type_ids")
            for row, index in enumerate(indices):
                encoded[index] = Encoded(out["input_ids"][row], types[row] if types is not None else None)
        for index, item in enumerate(encoded):
            if len(item) > limit:
                raise InputTooLong(index, len(item), limit)
        return encoded

    def tokens(self, texts: list[str], add_special_tokens: bool) -> list[list[dict]]:
        """TEI's /tokenize answer: per text, each token's id, text, whether it is special, and its
        character span in the text (None for special tokens)."""
        tokenizer = self.tokenizer()
        out = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True, return_attention_mask=False, return_token_type_ids=False)
        result = []
        for text, ids, spans, specials in zip(texts, out["input_ids"], out["offset_mapping"],
                                              out["special_tokens_mask"]):
            pieces = tokenizer.convert_ids_to_tokens(ids)
            result.append([{"id": token, "text": piece if special else text[start:stop], "special": bool(special),
                            "start": None if special else start, "stop": None if special else stop}
                           for token, piece, (start, stop), special in zip(ids, pieces, spans, specials)])
        return result

    def batch_tensors(self, batch: list[Encoded]) -> dict:
        """Right-padded input_ids / attention_mask (/ token_type_ids) of the sequences, in their order."""
        lengths = torch.tensor([len(item) for item in batch])
        mask = torch.arange(int(lengths.max())).unsqueeze(0) < lengths.unsqueeze(1)
        input_ids = torch.full(mask.shape, self.pad_id, dtype=torch.long)
        input_ids[mask] = torch.tensor([token for item in batch for token in item.input_ids])
        tensors = {"input_ids": input_ids, "attention_mask": mask.long()}
        if self.uses_token_types:
            token_types = torch.zeros(mask.shape, dtype=torch.long)
            token_types[mask] = torch.tensor([t for item in batch for t in (item.token_type_ids or [0] * len(item))])
            tensors["token_type_ids"] = token_types
        return tensors

    def packed_tensors(self, batch: list[Encoded]) -> dict:
        """The sequences' input_ids back to back, their cu_seqlens (and token_type_ids), for encode_packed."""
        tensors = {"input_ids": torch.tensor([token for item in batch for token in item.input_ids]),
                   "cu_seqlens": torch.tensor([0, *itertools.accumulate(map(len, batch))], dtype=torch.int32)}
        if self.uses_token_types and getattr(self.loaded.model.config, "type_vocab_size", 0) > 0:
            types = [t for item in batch for t in (item.token_type_ids or [0] * len(item))]
            tensors["token_type_ids"] = torch.tensor(types)
        return tensors

    def forward(self, batch: list[Encoded]) -> torch.Tensor:
        """(len(batch), dim) float32: the pooled embedding (embedding models) or the logits (classifiers)."""
        if self.packed:
            return self.packed_forward(batch)
        tensors = self.batch_tensors(batch)
        with torch.inference_mode():
            output = self.loaded.model(**tensors)
            if self.loaded.kind == "classifier":
                return output.logits.float()
            mask = tensors["attention_mask"].bool()
            return pool(output.last_hidden_state.float(), mask, self.loaded.pooling)

    def packed_forward(self, batch: list[Encoded]) -> torch.Tensor:
        """forward's answer from encode_packed: the first pooling mode pooled there, any further one (cls and
        mean, concatenated as sentence-transformers does) from the same hidden states."""
        tensors = self.packed_tensors(batch)
        if self.loaded.kind == "classifier":
            with torch.inference_mode():
                return classify_packed(self.loaded.model, **tensors).logits.float()
        first, *others = self.loaded.pooling
        with torch.inference_mode():
            output = encode_packed(self.loaded.model, **tensors, pooling=first)
            pooled = [output.pooled, *(pool_packed(output.last_hidden_state, tensors["cu_seqlens"], mode)
                                       for mode in others)]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)


def runs_packed(loaded: LoadedModel) -> bool:
    """Whether the forward runs packed: an embedding model pooled by mean and/or cls, of a family and modules
    encode_packed runs, or a classifier whose head classify_packed knows (their own checks: they refuse the
    rest, which keeps the padded path)."""
    if loaded.kind == "classifier":
        return packed_head_problem(loaded.model) is None
    return (loaded.kind == "embedding" and set(loaded.pooling) <= set(PACKED_POOLING)
            and packed_problem(loaded.model) is None)


def settle_dtype(loaded: LoadedModel, requested: str) -> LoadedModel:
    """Records the dtype choice on `loaded`; --dtype auto casts the model to bf16 when choose_dtype says so."""
    loaded.dtype_choice = choose_dtype(requested, lambda: bf16_cosine(loaded))
    if requested == "auto" and loaded.dtype_choice.dtype == "bf16":
        loaded.model = loaded.model.to(torch.bfloat16)
    return loaded


def bf16_cosine(loaded: LoadedModel) -> float:
    """Mean cosine of a bf16 copy's outputs (pooled embeddings or logits) to the fp32 model's, through the
    served forward, on fastbert's built-in calibration texts."""
    from fastbert.bench.calibration_texts import sentences

    texts = sentences(CALIBRATION_TEXTS, seed=0)
    bf16 = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(torch.bfloat16))
    reference, candidate = (_outputs(Engine(model), texts) for model in (loaded, bf16))
    if reference.shape[1] == 1:  # one score per text: compare the score vectors over the texts
        reference, candidate = reference.T, candidate.T
    return F.cosine_similarity(reference, candidate, dim=1).mean().item()


def _outputs(engine: Engine, texts: list[str]) -> torch.Tensor:
    encoded = engine.tokenize(texts, truncate=True)
    return torch.cat([engine.forward(encoded[start:start + CALIBRATION_BATCH])
                      for start in range(0, len(encoded), CALIBRATION_BATCH)])
