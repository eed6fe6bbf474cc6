"""The implementations being compared: fastbert and HuggingFace baselines with identical weights.

Each implementation is an `Implementation`: a model plus a `step(workload)` that does one timed unit
of work (inference: a forward under inference_mode; training: forward + backward + AdamW step) and
an `output(workload)` used for the cross-check (eval mode, no dropout, no grad).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import transformers

import fastbert
from fastbert.bench import onnx_baseline, openvino_baseline
from fastbert.presets import preset_config

BASELINES = ("hf-eager", "hf-sdpa", "hf-compile", "onnxruntime", "openvino")
FASTBERT = "fastbert"
SEED = 0
# transformers model_type of every family fastbert.patch() runs on the fast path.
FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "modernbert", "mpnet",
            "deberta-v2")


class ModelSetupError(RuntimeError):
    """The model directory or options cannot produce comparable models."""


def load_config(model_dir: str | None, arch: str | None = None) -> transformers.PretrainedConfig:
    """The config of `model_dir`, or of the built-in `arch` (fastbert/presets.py), or bert-base."""
    if model_dir is not None and arch is not None:
        raise ModelSetupError("give --model or --arch, not both")
    if model_dir is None:
        try:
            return preset_config(arch or "bert-base")
        except ValueError as exc:
            raise ModelSetupError(str(exc)) from None
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type not in FAMILIES:
        raise ModelSetupError(
            f"{model_dir}: model_type is {config.model_type!r}; fastbert bench runs {', '.join(FAMILIES)}"
        )
    return config


def _auto_class(mode: str):
    return transformers.AutoModelForMaskedLM if mode == "training" else transformers.AutoModel


def _copy_config(config, attn_implementation: str):
    copy = type(config).from_dict(config.to_dict())
    copy._attn_implementation = available_attention(config, attn_implementation)
    return copy


def available_attention(config, wanted: str) -> str:
    """`wanted`, or "eager" where transformers' class has no SDPA attention (MPNet): eager is then its only
    attention, so hf-sdpa (the reference) times it."""
    model_class = transformers.AutoModel._model_mapping.get(type(config), None)
    if wanted == "sdpa" and model_class is not None and not model_class._supports_sdpa:
        return "eager"
    return wanted


def build_reference(config, model_dir: str | None, mode: str) -> torch.nn.Module:
    """The HuggingFace model whose weights every implementation copies (seeded random or from disk)."""
    if model_dir is None:
        torch.manual_seed(SEED)
        return _auto_class(mode).from_config(_copy_config(config, "sdpa"))
    return _auto_class(mode).from_pretrained(model_dir, local_files_only=True,
                                             attn_implementation=available_attention(config, "sdpa"))


def _hf_copy(reference: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    model = type(reference)(_copy_config(reference.config, attn_implementation))
    model.load_state_dict(reference.state_dict())
    return model


def build_fastbert(reference: torch.nn.Module) -> torch.nn.Module:
    """A copy of the reference (same HF class and weights) with fastbert.patch() applied."""
    model = _hf_copy(reference, "sdpa")
    try:
        return fastbert.patch(model)
    except ValueError as exc:
        raise ModelSetupError(f"fastbert.patch cannot run {type(model).__name__}: {exc}") from None


def build_baseline(name: str, reference: torch.nn.Module) -> torch.nn.Module:
    """A HuggingFace copy of the reference: eager or SDPA attention, or torch.compile of the SDPA one."""
    if name not in BASELINES:
        raise ModelSetupError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    exported = ("hf-eager", onnx_baseline.NAME, openvino_baseline.NAME)  # the ONNX exporter traces eager attention
    return _hf_copy(reference, "eager" if name in exported else "sdpa")


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


def model_input_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The workload inputs this model's forward takes (DistilBERT has no token_type_ids)."""
    parameters = inspect.signature(model.forward).parameters
    return tuple(name for name in onnx_baseline.INPUT_ORDER if name in parameters)


def _eager_to_export(baseline, error: type[Exception], reference: torch.nn.Module, options, device, dtype):
    """The eager model that an exporting baseline (onnx_baseline, openvino_baseline) exports, once its module's
    check_usable passes; its refusal (`error`) becomes a ModelSetupError."""
    try:
        baseline.check_usable(device, dtype, options.mode)
    except error as exc:
        raise ModelSetupError(str(exc)) from None
    return build_baseline(baseline.NAME, reference).to(dtype=dtype)


def build_onnxruntime(reference: torch.nn.Module, options, device, dtype):
    eager = _eager_to_export(onnx_baseline, onnx_baseline.OnnxBaselineError, reference, options, device, dtype)
    return onnx_baseline.OnnxRuntimeImplementation(eager, model_input_names(eager))


def build_openvino(reference: torch.nn.Module, options, device, dtype) -> dict:
    eager = _eager_to_export(
        openvino_baseline, openvino_baseline.OpenVinoBaselineError, reference, options, device, dtype
    )
    return openvino_baseline.build(eager, model_input_names(eager))


def build_implementations(options, config, device, dtype) -> dict:
    """fastbert and every requested baseline, all with the same weights, device and dtype."""
    reference = build_reference(config, options.model, options.mode)
    impls = {}
    for name in options.baselines:
        if name == onnx_baseline.NAME:
            impls[name] = build_onnxruntime(reference, options, device, dtype)
            continue
        if name == openvino_baseline.NAME:  # two implementations: the f32 hint and the default precision
            impls.update(build_openvino(reference, options, device, dtype))
            continue
        impls[name] = make_implementation(
            name, build_baseline(name, reference), options.mode, device, dtype, options.backend
        )
    impls[FASTBERT] = make_implementation(
        FASTBERT, build_fastbert(reference), options.mode, device, dtype, options.backend
    )
    return impls
