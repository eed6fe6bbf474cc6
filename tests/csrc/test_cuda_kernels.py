"""The CUDA kernels of fastbert._C_cuda (backend "cuda") against the float64 references.

Same rule as the CPU tests: err(cuda, fp64 ref) <= 2 * err(torch same dtype, fp64 ref) + atol, atol =
tests.helpers.ATOL[dtype] x max(1, max |ref|), forward and every gradient. Skipped without a GPU or
without the compiled CUDA kernels (the reason is given).
"""
from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert import extension, ops
from tests.helpers import ATOL, assert_close_to_ref

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA kernels are only compiled here (tests/csrc/test_cuda_compile.py)",
                allow_module_level=True)
if extension.cuda_load_problem() is not None:
    pytest.skip(f"CUDA kernels unavailable: {extension.cuda_load_problem()}", allow_module_level=True)

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [1, 7, 768, 1000, 3072, 8192]


def check(fast, same, ref64, name):
    atol = ATOL[same.dtype] * (max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0)
    assert_close_to_ref(fast, same, ref64, atol=atol, name=name)


def run_three(fn, inputs: dict):
    results = []
    for backend, cast in (("cuda", None), ("torch", None), ("torch", torch.float64)):
        args = {k: (v.detach().to(cast or v.dtype).requires_grad_() if isinstance(v, torch.Tensor) else v)
                for k, v in inputs.items()}
        with fastbert.use_backend(backend):
            out = fn(**args)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out))
        results.append((out, {k: v.grad for k, v in args.items() if isinstance(v, torch.Tensor)}))
    (fast, fg), (same, sg), (ref, rg) = results
    check(fast, same, ref, "output")
    for name in rg:
        check(fg[name], sg[name], rg[name], f"grad {name}")


def rand(*shape, dtype, scale=1.0, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + offset).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_gelu(dtype, width, approximate, with_bias):
    bias = rand(width, dtype=dtype, seed=1) if with_bias else None
    inputs = dict(x=rand(2, 5, width, dtype=dtype, scale=3), bias=bias)
    run_three(lambda x, bias: ops.bias_gelu(x, bias, approximate), inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("optional", ["all", "none"])
def test_add_layer_norm(dtype, width, optional):
    full = optional == "all"
    inputs = dict(
        x=rand(2, 5, width, dtype=dtype, scale=2, offset=0.5),
        residual=rand(2, 5, width, dtype=dtype, seed=1) if full else None,
        weight=rand(width, dtype=dtype, scale=0.1, offset=1.0, seed=2),
        bias=rand(width, dtype=dtype, scale=0.1, seed=3) if full else None,
        x_bias=rand(width, dtype=dtype, scale=0.1, seed=4) if full else None,
    )
    run_three(lambda x, residual, weight, bias, x_bias: ops.add_layer_norm(x, residual, weight, bias, 1e-12,
                                                                           x_bias=x_bias), inputs)


def test_unaligned_rows_take_the_scalar_path():
    base = rand(3 * 768 + 1, dtype=torch.bfloat16)
    x = base[1:].view(3, 768)  # 2-byte offset: no 16-byte packs
    run_three(lambda x: ops.add_layer_norm(x, None, torch.ones(768, device=DEVICE, dtype=x.dtype), None, 1e-5),
              dict(x=x))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_matches_cpu_kernels(p):
    if extension.load_problem() is not None:
        pytest.skip(f"fastbert._C unavailable: {extension.load_problem()}")
    shape = (4, 8, 1000)
    outs = {}
    for backend, device in (("cuda", "cuda"), ("cpp", "cpu")):
        torch.manual_seed(11)
        with fastbert.use_backend(backend):
            outs[backend] = ops.add_layer_norm(torch.ones(shape, device=device), None,
                                               torch.ones(shape[-1], device=device), None, 1e-5, dropout_p=p)
    keep_cuda, keep_cpu = outs["cuda"].cpu() > 0, outs["cpp"] > 0
    assert torch.equal(keep_cuda, keep_cpu)
    assert abs(keep_cuda.float().mean().item() - (1 - p)) < 0.02


def test_dropout_backward_uses_the_forward_mask():
    shape, p = (16, 512), 0.3
    x = rand(*shape, dtype=torch.float32).requires_grad_()
    torch.manual_seed(5)
    with fastbert.use_backend("cuda"):
        y = ops.add_layer_norm(torch.ones(shape, device=DEVICE), None, torch.ones(512, device=DEVICE), None, 1e-5,
                               dropout_p=p)
    keep = y > 0
    torch.manual_seed(5)
    with fastbert.use_backend("cuda"):
        out = ops.add_layer_norm(x, None, torch.ones(512, device=DEVICE), None, 1e-5, dropout_p=p)
    x64 = x.detach().double().requires_grad_()
    ref = torch.nn.functional.layer_norm(x64 * keep / (1 - p), (512,), eps=1e-5)
    g = torch.randn(shape, device=DEVICE)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)


def test_opcheck_on_cuda():
    import fastbert.ops.extension.add_layer_norm  # noqa: F401  (registers the ops)
    import fastbert.ops.extension.bias_gelu  # noqa: F401

    x = rand(3, 40, dtype=torch.bfloat16).requires_grad_()
    b = rand(40, dtype=torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.fastbert.extension_bias_gelu_fwd.default, (x, b, "none"))
    w = rand(40, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.fastbert.extension_add_layer_norm_fwd.default,
                          (x, x.detach().clone().requires_grad_(), w, None, None, 1e-12, 0.1, torch.tensor([3])))


def test_width_limit_is_a_clear_error():
    from fastbert.ops.extension.add_layer_norm import add_layer_norm_extension

    with pytest.raises(ValueError, match="rows of at most 8192 elements, got 8200"):
        add_layer_norm_extension(rand(2, 8200, dtype=torch.float32), None,
                                 torch.ones(8200, device=DEVICE), None, 1e-5)
