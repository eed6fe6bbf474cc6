"""Direct transformers computations the server's answers are compared with."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import transformers


@functools.lru_cache(maxsize=8)
def _loaded(model_dir: str, head: str):
    model_class = getattr(transformers, head)
    return model_class.from_pretrained(model_dir).eval(), transformers.AutoTokenizer.from_pretrained(model_dir)


def reference_embeddings(model_dir: str, texts: list[str], normalize: bool = True, **tokenizer_args) -> torch.Tensor:
    """transformers' BertModel, masked mean pooling, optional L2 normalization."""
    model, tokenizer = _loaded(model_dir, "BertModel")
    batch = tokenizer(texts, padding=True, return_tensors="pt", **tokenizer_args)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=1) if normalize else pooled


def reference_logits(model_dir: str, first: list[str], second: list[str] | None = None) -> torch.Tensor:
    model, tokenizer = _loaded(model_dir, "BertForSequenceClassification")
    batch = tokenizer(first, second, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits
