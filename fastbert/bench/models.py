"""The implementations being compared: fastbert and HuggingFace baselines with identical weights.

Each implementation is an `Implementation`: a model plus a `step(workload)` that does one timed unit
of work (inference: a forward under inference_mode; training: forward + backward + AdamW step) and
an `output(workload)` used for the cross-check (eval mode, no dropout, no grad).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import transformers

import fastbert

BASELINES = ("hf-eager", "hf-sdpa", "hf-compile")
FASTBERT = "fastbert"
SEED = 0


class ModelSetupError(RuntimeError):
    """The model directory or options cannot produce comparable models."""


def load_config(model_dir: str | None) -> transformers.BertConfig:
    """The BERT config of `model_dir`, or bert-base (transformers.BertConfig() defaults)."""
    if model_dir is None:
        return transformers.BertConfig()
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type != "bert":
        raise ModelSetupError(f"{model_dir}: model_type is {config.model_type!r}, fastbert bench needs a BERT model")
    return config


def _hf_class(mode: str):
    return transformers.BertForMaskedLM if mode == "training" else transformers.BertModel


def _fastbert_class(mode: str):
    return fastbert.BertForMaskedLM if mode == "training" else fastbert.BertModel


def build_reference(config, model_dir: str | None, mode: str) -> torch.nn.Module:
    """The HuggingFace model whose weights every implementation copies (seeded random or from disk)."""
    cls = _hf_class(mode)
    if model_dir is None:
        torch.manual_seed(SEED)
        config = transformers.BertConfig.from_dict(config.to_dict())
        config._attn_implementation = "sdpa"
        return cls(config)
    return cls.from_pretrained(model_dir, local_files_only=True, attn_implementation="sdpa")


def build_fastbert(reference: torch.nn.Module, model_dir: str | None, mode: str) -> torch.nn.Module:
    """fastbert's model with the reference's weights (loaded by fastbert itself when from disk)."""
    cls = _fastbert_class(mode)
    if model_dir is None:
        model = cls(reference.config)
    else:
        model = cls.from_pretrained(model_dir, local_files_only=True, init_new_head=mode == "training")
    # A checkpoint without an MLM head gets a random head on each side: make them the same one.
    model.load_state_dict(reference.state_dict())
    return model


def build_baseline(name: str, reference: torch.nn.Module) -> torch.nn.Module:
    """A HuggingFace copy of the reference: eager or SDPA attention, or torch.compile of the SDPA one."""
    if name not in BASELINES:
        raise ModelSetupError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    config = transformers.BertConfig.from_dict(reference.config.to_dict())
    config._attn_implementation = "eager" if name == "hf-eager" else "sdpa"
    model = type(reference)(config)
    model.load_state_dict(reference.state_dict())
    return model


@dataclass
class Implementation:
    name: str
    model: torch.nn.Module
    mode: str
    backend: str | None = None  # fastbert's backend, None for HuggingFace
    compiled: bool = False
    runner: object = None  # what is called: the model or its torch.compile wrapper
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    def _context(self):
        return fastbert.use_backend(self.backend) if self.backend else contextlib.nullcontext()

    def step(self, workload) -> None:
        """One timed unit of work."""
        with self._context():
            if self.mode == "inference":
                with torch.inference_mode():
                    self.runner(**workload.inputs)
                return
            output = self.runner(**workload.inputs, labels=workload.labels)
            output.loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def output(self, workload) -> torch.Tensor:
        """Eval-mode output for the cross-check: last_hidden_state (inference) or MLM logits (training)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._context(), torch.no_grad():
                result = self.runner(**workload.inputs)  # the compiled model, for hf-compile
        finally:
            self.model.train(was_training)
        return result.last_hidden_state if self.mode == "inference" else result.logits


def make_implementation(name: str, model: torch.nn.Module, mode: str, device, dtype, backend: str) -> Implementation:
    model = model.to(device=device, dtype=dtype)
    model.train(mode == "training")
    impl = Implementation(name=name, model=model, mode=mode, backend=backend if name == FASTBERT else None)
    impl.runner = model
    if name == "hf-compile":
        impl.runner = torch.compile(model)
        impl.compiled = True
    if mode == "training":
        impl.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return impl


def build_implementations(options, config, device, dtype) -> dict[str, Implementation]:
    """fastbert and every requested baseline, all with the same weights, device and dtype."""
    reference = build_reference(config, options.model, options.mode)
    impls = {}
    for name in options.baselines:
        impls[name] = make_implementation(
            name, build_baseline(name, reference), options.mode, device, dtype, options.backend
        )
    impls[FASTBERT] = make_implementation(
        FASTBERT, build_fastbert(reference, options.model, options.mode), options.mode, device, dtype, options.backend
    )
    return impls
