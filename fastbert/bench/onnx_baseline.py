"""The `onnxruntime` baseline of `fastbert bench` (CPU, inference, fp32; extra: pip install fastbert[onnx]).

The eager HuggingFace model (identical weights) is exported to ONNX with dynamic batch and sequence
axes, optimized by onnxruntime.transformers' optimizer for model_type "bert" (fused Attention,
SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), and run by an InferenceSession with as
many intra-op threads as torch uses and thread spinning off (spinning threads would steal the cores
from whichever implementation runs next in the interleaved timing).
"""
from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import warnings
from pathlib import Path

import torch

NAME = "onnxruntime"
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
MISSING_EXTRA = (
    "the onnxruntime baseline needs the optional extra: pip install 'fastbert[onnx]' (onnxruntime and onnx); missing: "
)


class OnnxBaselineError(RuntimeError):
    """The onnxruntime baseline cannot run here; the message says why."""


def missing_packages() -> list[str]:
    return [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]


def check_usable(device: torch.device, dtype: torch.dtype, mode: str) -> None:
    missing = missing_packages()
    if missing:
        raise OnnxBaselineError(MISSING_EXTRA + ", ".join(missing))
    if device.type != "cpu" or dtype != torch.float32 or mode != "inference":
        raise OnnxBaselineError(
            f"the onnxruntime baseline runs CPU fp32 inference only (got {device.type}, {dtype}, {mode})"
        )


class _LastHiddenState(torch.nn.Module):
    """Positional inputs -> last_hidden_state, the shape of graph torch.onnx.export wants."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.input_names, inputs))).last_hidden_state


def export(model: torch.nn.Module, input_names: tuple[str, ...], path: Path) -> None:
    """torch.onnx.export (TorchScript exporter: the graph the ORT BERT fusions match), dynamic axes."""
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*input_names, "last_hidden_state")}
    # The wrapper itself must be in eval mode: the exporter puts the wrapper's mode back onto every
    # submodule afterwards, and a fresh module is in training mode (the model would then run dropout).
    wrapper = _LastHiddenState(model, input_names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, example, str(path), input_names=list(input_names),
            output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False,
        )


def optimize(source: Path, target: Path, config) -> dict:
    """onnxruntime.transformers' BERT fusions; returns the count of each fused operator."""
    from onnxruntime.transformers import optimizer

    with contextlib.redirect_stdout(None):
        optimized = optimizer.optimize_model(
            str(source), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size,
        )
    optimized.save_model_to_file(str(target))
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeImplementation:
    """Same interface as bench.models.Implementation: step(workload) and output(workload)."""

    name = NAME
    model = None
    mode = "inference"

    def __init__(self, eager_model: torch.nn.Module, input_names: tuple[str, ...]):
        self.input_names = input_names
        with tempfile.TemporaryDirectory(prefix="fastbert-onnx-") as folder:
            exported, optimized = Path(folder) / "model.onnx", Path(folder) / "model.opt.onnx"
            export(eager_model, input_names, exported)
            self.fused_operators = optimize(exported, optimized, eager_model.config)
            self.session = session(optimized, torch.get_num_threads())

    def _feeds(self, workload) -> dict:
        return {name: workload.inputs[name].numpy() for name in self.input_names}

    def step(self, workload) -> None:
        self.session.run(None, self._feeds(workload))

    def output(self, workload) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, self._feeds(workload))[0])
