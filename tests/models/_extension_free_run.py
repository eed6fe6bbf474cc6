"""Every model family and ModernBERT, native and patched, fp32 and bf16 (inference and a training step), an
int8 quantize, `fastbert info` and `fastbert serve`'s /embed. test_without_extension.py runs this file in a
fresh process with FASTBERT_NO_EXT=1 (the extension is probed once per process), which saves the results
(torch.save) to argv[1], and calls `compared()` itself, with the extension:

    FASTBERT_NO_EXT=1 python -m tests.models._extension_free_run OUT.pt
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

import fastbert
from fastbert.models.families import FAMILIES
from tests.models.family_configs import family_batch, family_config
from tests.models.test_modernbert import modernbert_config

LENGTHS, SEQLEN = [7, 3], 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a fast model runs on cpu without its kernels".split()]


def models() -> dict[str, transformers.PretrainedConfig]:
    """Class prefix -> a tiny config, for every family fastbert runs."""
    return {**{family.class_prefix: family_config(family.model_type) for family in FAMILIES},
            "ModernBert": modernbert_config(
                vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, local_attention=4,
                global_attn_every_n_layers=2, max_position_embeddings=32, num_labels=2)}


def build(name: str, config, patched: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The same random weights in every process: one seed, then fastbert's class or transformers' patched."""
    torch.manual_seed(0)
    if patched:
        return fastbert.patch(getattr(transformers, name)(config)).to(dtype)
    return getattr(fastbert, name)(config).to(dtype)


def inference(prefix: str, config, patched: bool, dtype: torch.dtype, batch: dict) -> dict:
    model = build(prefix + "Model", config, patched, dtype).eval()
    with torch.inference_mode():  # the inference plan's path, where the few-rows GEMMs ran
        return {"last_hidden_state": model(**batch).last_hidden_state.float()}


def training_step(prefix: str, config, patched: bool, dtype: torch.dtype, batch: dict) -> dict:
    model = build(prefix + "ForSequenceClassification", config, patched, dtype).train()
    loss = model(**batch, labels=torch.tensor([0, 1])).loss
    loss.backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach().float(), **grads}


def model_results() -> dict:
    results = {}
    for prefix, config in models().items():
        batch = family_batch(config, LENGTHS, SEQLEN, generator=torch.Generator().manual_seed(1))
        for patched in (False, True):
            for dtype_name, dtype in DTYPES.items():
                key = f"{prefix} {'patched' if patched else 'native'} {dtype_name}"
                results[f"{key} inference"] = inference(prefix, config, patched, dtype, batch)
                results[f"{key} training"] = training_step(prefix, config, patched, dtype, batch)
    return results


def quantize_refusal() -> str | None:
    """The message fastbert.quantize raises; None when it quantizes."""
    config = family_config("bert")
    batch = family_batch(config, LENGTHS, SEQLEN, generator=torch.Generator().manual_seed(2))
    try:
        fastbert.quantize(build("BertModel", config, False, torch.float32), calibration=[batch],
                          min_cosine_mean=0.0, min_cosine=-1.0)
    except fastbert.BackendUnavailableError as error:
        return str(error)
    return None


def info() -> str:
    from fastbert.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["info", "--no-compare"])
    return out.getvalue()


def embed() -> list:
    """`fastbert serve`'s app on a tiny BERT and tokenizer saved in a temporary folder: /embed's answer."""
    from fastapi.testclient import TestClient

    from fastbert.serve import ServeOptions, create_app

    config = family_config("bert", vocab_size=len(WORDS))
    with tempfile.TemporaryDirectory() as folder:
        build("BertModel", config, False, torch.float32).save_pretrained(folder)
        transformers.BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)}).save_pretrained(folder)
        with TestClient(create_app(ServeOptions(folder, pooling="mean"))) as client:
            response = client.post("/embed", json={"inputs": ["the fast model", "runs on cpu without its kernels"]})
    assert response.status_code == 200, response.text
    return response.json()


def compared() -> dict:
    """What both sides compute: every model's outputs and gradients, and /embed's answer."""
    return {"models": model_results(), "embed": embed()}


def extension_free_checks() -> dict:
    return {"quantize": quantize_refusal(), "info": info(), "loaded _C": "fastbert._C" in sys.modules}


@contextlib.contextmanager
def strict():
    """One torch thread on both sides (they run at once), and a fast path's fallback to transformers'
    forward, which warns, is an error: it would compare nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fastbert", category=UserWarning)
            yield
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    with strict():
        results = {**compared(), **extension_free_checks()}
    torch.save(results, Path(sys.argv[1]))
