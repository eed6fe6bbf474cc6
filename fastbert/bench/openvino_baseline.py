"""The `openvino` baseline of `fastbert bench` (CPU inference; extra: pip install fastbert[openvino]).

The eager HuggingFace model (identical weights) is exported to ONNX exactly as for the onnxruntime
baseline (bench/onnx_baseline.export: dynamic batch and sequence axes), read by OpenVINO's runtime and
compiled for its CPU plugin twice:
  "openvino-f32"      INFERENCE_PRECISION_HINT=f32: the same precision as fastbert fp32;
  "openvino-default"  no precision hint: the plugin's default (bf16 on CPUs with AVX-512 BF16 or AMX,
                      else f32; the record names what it chose), cross-checked at bf16's tolerance
                      when it is not f32.
Both use as many inference threads as torch uses, one stream and the LATENCY hint; the bench times
them interleaved with the other implementations, in rotated order. In one process the two runtimes'
thread pools contend for the cores, which slows both on a small machine (MiniLM 1 x 16 on 2 cores:
OpenVINO f32 4.07 ms here, 2.33 ms alone); for latency figures run each runtime in its own process
with benchmarks/isolated_latency.py.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from fastbert.bench import onnx_baseline

NAME = "openvino"
IMPLEMENTATIONS = ("openvino-f32", "openvino-default")
MISSING_EXTRA = (
    "the openvino baseline needs the optional extra: pip install 'fastbert[openvino]' (openvino and onnx); missing: "
)
# OpenVINO's element type names -> torch dtypes, for the cross-check tolerance.
_PRECISIONS = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class OpenVinoBaselineError(RuntimeError):
    """The openvino baseline cannot run here; the message says why."""


def missing_packages() -> list[str]:
    return [name for name in ("openvino", "onnx") if importlib.util.find_spec(name) is None]


def check_usable(device: torch.device, dtype: torch.dtype, mode: str) -> None:
    missing = missing_packages()
    if missing:
        raise OpenVinoBaselineError(MISSING_EXTRA + ", ".join(missing))
    if device.type != "cpu" or dtype != torch.float32 or mode != "inference":
        raise OpenVinoBaselineError(
            f"the openvino baseline runs CPU inference of an fp32 model only (got {device.type}, {dtype}, {mode}); "
            "its default precision is measured as openvino-default"
        )


def compile_config(threads: int, f32: bool) -> dict:
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def precision_of(compiled) -> str:
    """What the plugin runs in: "f32", "bf16", ... (OpenVINO's element type name)."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


class OpenVinoImplementation:
    """Same interface as bench.models.Implementation: step(workload) and output(workload)."""

    model = None
    mode = "inference"

    def __init__(self, name: str, compiled, input_names: tuple[str, ...]):
        self.name, self.input_names = name, input_names
        self.request = compiled.create_infer_request()
        self.precision = precision_of(compiled)
        self.tolerance_dtype = _PRECISIONS.get(self.precision, torch.bfloat16)

    def _feeds(self, workload) -> dict:
        return {name: workload.inputs[name].numpy() for name in self.input_names}

    def step(self, workload) -> None:
        self.request.infer(self._feeds(workload))

    def output(self, workload) -> torch.Tensor:
        self.request.infer(self._feeds(workload))
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def build(eager_model: torch.nn.Module, input_names: tuple[str, ...]) -> dict[str, OpenVinoImplementation]:
    """Export once, compile with the f32 hint and with the default precision: {name: implementation}."""
    import openvino

    core = openvino.Core()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="fastbert-openvino-") as folder:
        exported = Path(folder) / "model.onnx"
        onnx_baseline.export(eager_model, input_names, exported)
        graph = core.read_model(str(exported))
        compiled = {name: core.compile_model(graph, "CPU", compile_config(threads, f32=name.endswith("f32")))
                    for name in IMPLEMENTATIONS}
    return {name: OpenVinoImplementation(name, model, input_names) for name, model in compiled.items()}
