"""Fused ops x backends at BERT shapes: forward and forward+backward.

    python -m pytest benchmarks/test_ops.py --benchmark-group-by=group

Rows = 4096 tokens (e.g. batch 32 x seq 128); widths 768 (hidden of bert-base) and 3072 (its
intermediate size, where bias+GELU runs). CPU runs fp32 on backends torch and cpp; CUDA runs bf16
on torch, triton and cuda. The fwd+bwd variant times torch.autograd.grad (no .grad accumulation).
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert import ops

try:
    from benchmarks.conftest import backend_skip_reason, sync
except ImportError:  # benchmarks/ itself on sys.path (pytest's rootdir-less import mode)
    from conftest import backend_skip_reason, sync

ROWS = 4096
WIDTHS = [768, 3072]
DIRECTIONS = ["fwd", "fwd+bwd"]
CASES = [("cpu", torch.float32, b) for b in ("torch", "cpp")] + [
    ("cuda", torch.bfloat16, b) for b in ("torch", "triton", "cuda")
]


def _inputs(op: str, device: str, dtype: torch.dtype, width: int, grad: bool):
    gen = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    if op == "bias_gelu":
        return dict(x=t(ROWS, width), bias=t(width))
    return dict(x=t(ROWS, width), residual=t(ROWS, width), weight=t(width), bias=t(width, scale=0.1),
                x_bias=t(width, scale=0.1))


def _call(op: str, inputs: dict):
    if op == "bias_gelu":
        return ops.bias_gelu(inputs["x"], inputs["bias"], "none")
    return ops.add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], 1e-12,
                              x_bias=inputs["x_bias"])


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("device,dtype,backend", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("op", ["bias_gelu", "add_layer_norm"])
def test_op(benchmark, op, device, dtype, backend, width, direction):
    reason = backend_skip_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend} on {device}: {reason}")
    grad = direction == "fwd+bwd"
    inputs = _inputs(op, device, dtype, width, grad)
    leaves = list(inputs.values())
    grad_out = torch.randn(ROWS, width, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    benchmark.group = f"{op} {device} {str(dtype).replace('torch.', '')} {ROWS}x{width} {direction}"
    benchmark.extra_info.update(op=op, backend=backend, device=device, rows=ROWS, width=width, direction=direction)

    def run():
        with fastbert.use_backend(backend):
            if grad:
                out = _call(op, inputs)
                result = torch.autograd.grad(out, leaves, grad_out)
            else:
                with torch.no_grad():
                    result = _call(op, inputs)
        sync(device)
        return result

    run()  # warm-up (lazy imports, first allocation)
    benchmark.pedantic(run, rounds=15, warmup_rounds=2, iterations=1)
