"""int8 inference with an accuracy gate: `fastbert.quantize(model, calibration=...)`.

Every candidate nn.Linear (those inside the encoder's layers) is replaced by an `Int8Linear` (weights
int8 per output channel, activations int8 per token, fastbert/cpu/int8_linear.py). Then the quantized
model is measured against the unquantized one on the caller's calibration data: the cosine between
their pooled outputs (mean over real tokens of last_hidden_state; a head's logits otherwise), per
example. While the gate fails (mean cosine < min_cosine_mean or any example < min_cosine), the
quantized Linear that costs most on its own (its sensitivity: the mean cosine loss when only it is
quantized) goes back to the original module, in the model's own precision. The report says what was
quantized, each candidate's sensitivity and output error, and what stayed unquantized.

Without calibration data there is nothing to measure, so quantize refuses: int8 that nobody checks is
a silent wrong answer (ONNX Runtime's dynamic int8 gives cosine 0.89 on all-MiniLM-L6-v2).

A quantized model is inference-only: Int8Linear raises in training mode or when autograd records, and
quantize() turns off requires_grad on the model's parameters. `save_quantized` writes a safetensors
file (int8 weights, scales, the list of quantized modules in the metadata); `load_quantized` puts
Int8Linear modules into a freshly built model of the same architecture and loads it; no code runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from fastbert.cpu import int8_linear as ops
from fastbert.ops.int8_linear import int8_linear

__all__ = ["Int8Linear", "QuantizationReport", "load_quantized", "quantize", "save_quantized"]

_METADATA_KEY = "fastbert_int8_modules"


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (per output channel scales) and per-token int8 activations.
    Inference only. The oneDNN-packed weight is a cache (not in state_dict), rebuilt on demand."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self._packed: tuple | None = None  # (weight_int8's data_ptr, its _version, packed weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        weight, scale = ops.quantize_weight(linear.weight)
        module.weight_int8.copy_(weight)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module.to(linear.weight.device).eval()

    def packed_weight(self) -> torch.Tensor | None:
        """The oneDNN-packed weight (cached while weight_int8 is unchanged), or None where the reference runs."""
        stamp = (self.weight_int8.data_ptr(), self.weight_int8._version)
        if self._packed is None or self._packed[:2] != stamp:
            self._packed = (*stamp, ops.packed_or_none(self.weight_int8))
        return self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_activation(x, None)

    def forward_with_activation(self, x: torch.Tensor, activation: str | None) -> torch.Tensor:
        """activation(self(x)), activation None, "gelu" or "gelu_tanh": the GELU runs in the dequantizing
        epilogue, one pass instead of two (fastbert.models.encoder calls this for the FFN's first GEMM)."""
        if self.training:
            raise RuntimeError("an int8-quantized model is inference-only: call model.eval() (training would "
                               "need gradients through rounding; fine-tune the unquantized model instead)")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("an int8-quantized model has no backward: run it under torch.no_grad() or "
                               "torch.inference_mode() (autograd is recording this call)")
        return int8_linear(x, self.weight_int8, self.weight_scale, self.bias, activation,
                           packed_weight=self.packed_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass
class LayerError:
    """One candidate Linear: its sensitivity (mean cosine loss of the model when only it is quantized)
    and the relative error of its own output (||y_int8 - y|| / ||y|| on the calibration data)."""

    sensitivity: float
    output_error: float


@dataclass
class QuantizationReport:
    quantized: list[str]
    kept: list[str]  # candidates left unquantized by the gate, in the model's own precision
    layers: dict[str, LayerError]
    mean_cosine: float  # on the calibration data, quantized vs unquantized, with the final choice
    min_cosine: float
    gate: tuple[float, float]  # (min_cosine_mean, min_cosine)
    examples: int
    model: nn.Module = field(repr=False, default=None)

    @property
    def passed(self) -> bool:
        return self.mean_cosine >= self.gate[0] and self.min_cosine >= self.gate[1]

    def summary(self) -> str:
        return (f"int8: {len(self.quantized)} of {len(self.layers)} Linears quantized, {len(self.kept)} kept; "
                f"cosine to the unquantized model on {self.examples} calibration examples: mean "
                f"{self.mean_cosine:.5f}, min {self.min_cosine:.5f} (gate {self.gate[0]}, {self.gate[1]})")


# ---- calibration data --------------------------------------------------------------------------------


def _batches(model: nn.Module, calibration, tokenizer, batch_size: int, max_length: int) -> list[dict]:
    """The calibration data as a list of model-input dicts: texts are tokenized, dicts/batches kept."""
    if calibration is None or (hasattr(calibration, "__len__") and len(calibration) == 0):
        raise ValueError(
            "fastbert.quantize needs calibration data (calibration=[a few hundred of your own texts, or "
            "tokenized batches]): it measures the int8 model against the unquantized one on them and keeps "
            "the layers whose quantization costs too much in their own precision. Without data it cannot "
            "check, and int8 that nobody checks is a silent wrong answer."
        )
    items = list(calibration)
    if all(isinstance(item, str) for item in items):
        tokenizer = tokenizer or _tokenizer_of(model)
        max_length = min(max_length, getattr(getattr(model, "config", None), "max_position_embeddings", max_length))
        return [dict(tokenizer(items[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")) for i in range(0, len(items), batch_size)]
    if all(isinstance(item, dict) for item in items):
        return [dict(item) for item in items]
    raise TypeError("calibration must be a list of texts or a list of model-input dicts (batches), "
                    f"got {sorted({type(item).__name__ for item in items})}")


def _tokenizer_of(model: nn.Module):
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path:
        raise ValueError("calibration texts need a tokenizer: pass tokenizer=, or tokenized batches")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def _pooled(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Per example: mean of last_hidden_state over real tokens, else the flattened logits (fp64)."""
    rows = []
    with torch.no_grad():
        for batch in batches:
            out = model(**batch)
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                rows.append(out.logits.double().flatten(1))
                continue
            mask = batch.get("attention_mask")
            mask = torch.ones(hidden.shape[:2]) if mask is None else mask
            mask = mask[..., None].double()
            rows.append((hidden.double() * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(rows)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# ---- module surgery ----------------------------------------------------------------------------------


def _candidates(model: nn.Module) -> dict[str, nn.Linear]:
    """The plain nn.Linear modules inside the encoder's layers (heads and poolers stay as they are)."""
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if type(module) is nn.Linear and ("layer" in parts or "layers" in parts):
            found[name] = module
    return found


def _layer_name(name: str) -> str:
    """"encoder.layer.3.attention.self.query" -> "encoder.layer.3"."""
    parts = name.split(".")
    index = max(i for i, part in enumerate(parts) if part in ("layer", "layers"))
    return ".".join(parts[: index + 2])


def _open_scope(module, args):
    ops.enter_shared_scope()


def _close_scope(module, args, output):
    ops.exit_shared_scope()


# The hooks quantize adds to encoder layers; an inference plan may skip them (it quantizes the QKV input once).
SCOPE_HOOKS = (_open_scope, _close_scope)


def _share_input_quantization(model: nn.Module, names: list[str]) -> None:
    """Per encoder layer with int8 Linears: its forward runs inside ops.shared_input_quantization (the
    query/key/value projections quantize their shared input once). always_call: closed on errors too."""
    for layer_name in dict.fromkeys(map(_layer_name, names)):
        layer = model.get_submodule(layer_name)
        if getattr(layer, "_fastbert_int8_scope", False):
            continue
        layer.register_forward_pre_hook(_open_scope)
        layer.register_forward_hook(_close_scope, always_call=True)
        layer._fastbert_int8_scope = True


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _error_hook(linear: nn.Linear, sums: list):
    """A forward hook for an Int8Linear: accumulates ||int8(x) - linear(x)||^2 and ||linear(x)||^2 on its inputs
    (the fast encoder calls a plain nn.Linear's weights directly, its quantized replacement as a module)."""
    def record(module, inputs, output):
        exact = linear(inputs[0]).double()
        sums[0] += (output.double() - exact).square().sum().item()
        sums[1] += exact.square().sum().item()
    return record


def _sensitivities(model, originals, quantized, batches, reference) -> dict[str, LayerError]:
    """Per candidate, quantized alone: the model's mean cosine loss, and the relative error of its own output."""
    result = {}
    for name in originals:
        sums = [0.0, 0.0]
        handle = quantized[name].register_forward_hook(_error_hook(originals[name], sums))
        _set_module(model, name, quantized[name])
        try:
            loss = 1.0 - _cosines(_pooled(model, batches), reference).mean().item()
        finally:
            _set_module(model, name, originals[name])
            handle.remove()
        result[name] = LayerError(loss, (sums[0] / sums[1]) ** 0.5 if sums[1] > 0 else 0.0)
    return result


# ---- the public entry points -------------------------------------------------------------------------


def quantize(
    model: nn.Module,
    calibration=None,
    *,
    tokenizer=None,
    min_cosine_mean: float = 0.995,
    min_cosine: float = 0.98,
    batch_size: int = 32,
    max_length: int = 128,
    sensitivity_examples: int = 64,
) -> QuantizationReport:
    """Quantize `model`'s encoder Linears to int8 in place, keeping those the accuracy gate rejects.

    calibration: a few hundred of your own texts (tokenized with `tokenizer`, default the model's own
    from config._name_or_path) or model-input dicts. The gate compares pooled outputs (per-example
    cosine) of the quantized and the unquantized model on all of them; sensitivities are measured on
    the first `sensitivity_examples` examples' batches. Returns a QuantizationReport (report.model is model).
    Raises BackendUnavailableError without the compiled extension, which quantizes the activations.
    """
    _require_int8_kernels()
    batches = _batches(model, calibration, tokenizer, batch_size, max_length)
    model.eval()
    model.requires_grad_(False)
    originals = _candidates(model)
    if not originals:
        raise ValueError(f"{type(model).__name__} has no nn.Linear inside its encoder layers to quantize")
    quantized = {name: Int8Linear.from_linear(linear) for name, linear in originals.items()}
    reference = _pooled(model, batches)
    probe_batches = _first_examples(batches, sensitivity_examples)
    layers = _sensitivities(model, originals, quantized, probe_batches, reference[: _count(probe_batches)])
    kept = _greedy_gate(model, originals, quantized, batches, reference, layers, (min_cosine_mean, min_cosine))
    names = [name for name in originals if name not in kept]
    _share_input_quantization(model, names)
    cosines = _cosines(_pooled(model, batches), reference)
    return QuantizationReport(
        quantized=names, kept=kept, layers=layers,
        mean_cosine=cosines.mean().item(), min_cosine=cosines.min().item(), gate=(min_cosine_mean, min_cosine),
        examples=reference.shape[0], model=model,
    )


def _require_int8_kernels() -> None:
    """Without fastbert._C every int8 GEMM would run the fp64 reference: correct, but slower than the
    unquantized model, so quantizing would only cost accuracy."""
    from fastbert import extension
    from fastbert.registry import BackendUnavailableError

    problem = extension.load_problem()
    if problem is not None:
        raise BackendUnavailableError(
            f"fastbert.quantize needs the compiled extension fastbert._C for its int8 kernels, and it is "
            f"unavailable ({problem}); run the model in fp32 or bf16, or install fastbert with its extension built")


def _greedy_gate(model, originals, quantized, batches, reference, layers, gate) -> list[str]:
    """Quantize all, then restore the most sensitive quantized Linear until the gate passes."""
    for name in originals:
        _set_module(model, name, quantized[name])
    kept: list[str] = []
    order = sorted(originals, key=lambda name: layers[name].sensitivity, reverse=True)
    while True:
        cosines = _cosines(_pooled(model, batches), reference)
        if (cosines.mean().item() >= gate[0] and cosines.min().item() >= gate[1]) or len(kept) == len(order):
            return kept
        worst = order[len(kept)]
        _set_module(model, worst, originals[worst])
        kept.append(worst)


def _count(batches: list[dict]) -> int:
    return sum(next(iter(batch.values())).shape[0] for batch in batches)


def _first_examples(batches: list[dict], examples: int) -> list[dict]:
    chosen, total = [], 0
    for batch in batches:
        if total >= examples:
            break
        chosen.append(batch)
        total += next(iter(batch.values())).shape[0]
    return chosen


def save_quantized(model: nn.Module, path: str) -> None:
    """Write the quantized model's state (int8 weights, scales, everything else) to a safetensors file."""
    from safetensors.torch import save_file

    names = [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    if not names:
        raise ValueError("the model has no Int8Linear: quantize it first (fastbert.quantize)")
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(_untied(state), path, metadata={_METADATA_KEY: json.dumps(names)})


def _untied(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): keep one copy each."""
    seen, result = set(), {}
    for key, value in state.items():
        address = (value.data_ptr(), value.dtype, tuple(value.shape)) if value.numel() else None
        result[key] = value.clone() if address in seen else value
        if address is not None:
            seen.add(address)
    return result


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Load a save_quantized file into `model`, a freshly built model of the same architecture: the
    Linears named in the file become Int8Linear, then the whole state is loaded (strictly)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as handle:
        names = json.loads((handle.metadata() or {}).get(_METADATA_KEY, "[]"))
    if not names:
        raise ValueError(f"{path} is not a fastbert int8 file (no {_METADATA_KEY} metadata)")
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__} in this model, not an nn.Linear")
        _set_module(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None))
    model.load_state_dict(load_file(path), strict=True)
    _share_input_quantization(model, names)
    model.eval()
    model.requires_grad_(False)
    return model
