"""ONNX Runtime dynamic int8, the baseline sentence-transformers documents as its fastest CPU path.

The eager HuggingFace model is exported and optimized exactly as for the fp32 onnxruntime baseline
(bench/onnx_baseline: ORT's BERT fusions), then `onnxruntime.quantization.quantize_dynamic` quantizes
its MatMul weights to int8 (QuantType.QInt8, ORT's defaults otherwise: per-tensor weights, activations
quantized per tensor at run time, uint8). Nothing checks its accuracy: the benchmark reports the
cosine to fp32 next to its time.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from fastbert.bench import onnx_baseline

NAME = "ort-int8"


def quantize_model(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the fused ops (Attention, SkipLayerNormalization, ...) defeat ONNX shape inference: name fp32 the default
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    with contextlib.redirect_stdout(None):
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, extra_options=extra)


class OnnxInt8Implementation(onnx_baseline.OnnxRuntimeImplementation):
    """step(workload) / output(workload), as the fp32 onnxruntime baseline, on the int8 graph."""

    name = NAME

    def __init__(self, eager_model: torch.nn.Module, input_names: tuple[str, ...]):
        self.input_names = input_names
        with tempfile.TemporaryDirectory(prefix="fastbert-onnx-int8-") as folder:
            exported, optimized = Path(folder) / "model.onnx", Path(folder) / "model.opt.onnx"
            quantized = Path(folder) / "model.int8.onnx"
            onnx_baseline.export(eager_model, input_names, exported)
            self.fused_operators = onnx_baseline.optimize(exported, optimized, eager_model.config)
            quantize_model(optimized, quantized)
            self.session = onnx_baseline.session(quantized, torch.get_num_threads())
