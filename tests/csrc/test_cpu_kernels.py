"""The CPU kernels of fastbert._C (backend "cpp") against the float64 references.

Rule: err(cpp, fp64 ref) <= 2 * err(torch reference in the same dtype, fp64 ref) + atol, with
atol = tests.helpers.ATOL[dtype] (fp32 1e-5, bf16 1e-2) scaled by max(1, max |ref|), for the output
and every gradient. Every test here is skipped (with the reason) when the extension is not built,
except test_extension_is_built_when_required, which CI runs with FASTBERT_REQUIRE_EXT=1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import extension, ops
from fastbert.env import flag
from tests.helpers import ATOL, assert_close_to_ref

PROBLEM = extension.load_problem()
requires_ext = pytest.mark.skipif(PROBLEM is not None, reason=f"fastbert._C unavailable: {PROBLEM}")

WIDTHS = [1, 7, 1000, 3072, 8192]
DTYPES = [torch.float32, torch.bfloat16]


def atol_for(ref: torch.Tensor) -> float:
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    return ATOL[torch.float32 if ref.dtype == torch.float64 else ref.dtype] * scale


def check(fast, same, ref64, dtype, name):
    atol = ATOL[dtype] * (max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0)
    assert fast.dtype == same.dtype, f"{name}: dtype {fast.dtype} != {same.dtype}"
    assert_close_to_ref(fast, same, ref64, atol=atol, name=name)


def leaf(t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_()


def run_three(fn, inputs: dict, grad_out_seed=0):
    """Run fn on (cpp, torch same dtype, fp64 torch) copies of inputs; returns outputs and grads."""
    results = []
    for backend, cast in (("cpp", None), ("torch", None), ("torch", torch.float64)):
        args = {k: leaf(v, cast) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with fastbert.use_backend(backend):
            out = fn(**args)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out.dtype)
        out.backward(g)
        grads = {k: v.grad for k, v in args.items() if isinstance(v, torch.Tensor)}
        results.append((out, grads))
    return results


def compare_all(results, dtype):
    (fast, fast_g), (same, same_g), (ref, ref_g) = results
    check(fast, same, ref, dtype, "output")
    for name in ref_g:
        assert fast_g[name] is not None, f"no gradient for {name}"
        check(fast_g[name], same_g[name], ref_g[name], same_g[name].dtype, f"grad {name}")


def test_extension_is_built_when_required():
    if not flag("FASTBERT_REQUIRE_EXT"):
        pytest.skip("FASTBERT_REQUIRE_EXT is not set (CI sets it to require a built extension)")
    assert PROBLEM is None, f"FASTBERT_REQUIRE_EXT=1 but the extension is unavailable: {PROBLEM}"
    assert fastbert.available_backends()["cpp"] is True


# ---------------------------------------------------------------- bias_gelu

@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_gelu(dtype, width, approximate, with_bias):
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(2, 3, width, generator=gen) * 3).to(dtype)
    bias = torch.randn(width, generator=gen).to(dtype) if with_bias else None
    results = run_three(lambda x, bias: ops.bias_gelu(x, bias, approximate), dict(x=x, bias=bias))
    compare_all(results, dtype)


@requires_ext
def test_bias_gelu_tails_and_2d():
    # far tails: GELU(v) -> v for large v, -> 0 (relatively accurate) for very negative v
    x = torch.linspace(-12, 12, 4001).reshape(1, -1)
    results = run_three(lambda x: ops.bias_gelu(x, None, "none"), dict(x=x))
    compare_all(results, torch.float32)


@requires_ext
def test_bias_gelu_non_contiguous():
    base = torch.randn(64, 48)
    x = base.t()  # (48, 64), non-contiguous
    bias = torch.randn(128)[::2]  # strided
    assert not x.is_contiguous() and not bias.is_contiguous()
    results = run_three(lambda x, bias: ops.bias_gelu(x, bias, "none"), dict(x=x, bias=bias))
    compare_all(results, torch.float32)


# ---------------------------------------------------------------- add_layer_norm

LN_CASES = {
    "all": dict(residual=True, bias=True, x_bias=True),
    "no_residual": dict(residual=False, bias=True, x_bias=True),
    "no_bias": dict(residual=True, bias=False, x_bias=True),
    "no_x_bias": dict(residual=True, bias=True, x_bias=False),
    "bare": dict(residual=False, bias=False, x_bias=False),
}


def ln_inputs(dtype, width, residual=True, bias=True, x_bias=True, shape=(2, 3), seed=0):
    gen = torch.Generator().manual_seed(seed + width)
    return dict(
        x=(torch.randn(*shape, width, generator=gen) * 2 + 0.5).to(dtype),
        residual=torch.randn(*shape, width, generator=gen).to(dtype) if residual else None,
        weight=(1 + 0.1 * torch.randn(width, generator=gen)).to(dtype),
        bias=(0.1 * torch.randn(width, generator=gen)).to(dtype) if bias else None,
        x_bias=(0.1 * torch.randn(width, generator=gen)).to(dtype) if x_bias else None,
    )


def ln_call(eps, dropout_p=0.0):
    def call(x, residual, weight, bias, x_bias):
        return ops.add_layer_norm(x, residual, weight, bias, eps, x_bias=x_bias, dropout_p=dropout_p)
    return call


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", list(LN_CASES))
def test_add_layer_norm(dtype, width, case):
    inputs = ln_inputs(dtype, width, **LN_CASES[case])
    compare_all(run_three(ln_call(1e-12), inputs), dtype)


@requires_ext
def test_add_layer_norm_fp32_params_with_bf16_activations():
    inputs = ln_inputs(torch.bfloat16, 768)
    inputs["weight"] = inputs["weight"].float()
    inputs["bias"] = inputs["bias"].float()
    compare_all(run_three(ln_call(1e-5), inputs), torch.bfloat16)


@requires_ext
def test_add_layer_norm_non_contiguous():
    inputs = ln_inputs(torch.float32, 96, shape=(4,))
    inputs["x"] = torch.randn(96, 4).t()
    inputs["residual"] = torch.randn(4, 192)[:, ::2]
    inputs["weight"] = torch.randn(192)[::2]
    assert not inputs["x"].is_contiguous() and not inputs["residual"].is_contiguous()
    compare_all(run_three(ln_call(1e-12), inputs), torch.float32)


@requires_ext
def test_add_layer_norm_large_offset_rows():
    # large mean, small spread: the two-pass variance must not cancel
    inputs = ln_inputs(torch.float32, 1000, residual=False)
    inputs["x"] = inputs["x"] * 1e-2 + 300.0
    compare_all(run_three(ln_call(1e-12), inputs), torch.float32)


# ---------------------------------------------------------------- dropout

def masked_ref(x, residual, weight, bias, x_bias, eps, keep, p):
    """The reference with an explicit dropout mask (keep: bool, same shape as x)."""
    math = torch.promote_types(x.dtype, torch.float32)
    h = x.to(math)
    if x_bias is not None:
        h = h + x_bias.to(math)
    h = h * keep.to(math) / (1.0 - p)
    if residual is not None:
        h = h + residual.to(math)
    b = bias.to(math) if bias is not None else None
    return F.layer_norm(h, (h.shape[-1],), weight.to(math), b, eps).to(x.dtype)


def recover_mask(shape, p, seed):
    """The mask drawn for `shape` after torch.manual_seed(seed), read off an output: with x = 1 and
    no residual/bias, kept elements normalize to positive values and dropped ones to negative."""
    torch.manual_seed(seed)
    with fastbert.use_backend("cpp"):
        y = ops.add_layer_norm(torch.ones(shape), None, torch.ones(shape[-1]), None, 1e-5, dropout_p=p)
    return y > 0


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_fraction_and_gradients(dtype, p):
    shape, seed = (4, 8, 1000), 1234
    keep = recover_mask(shape, p, seed)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 0.02, f"kept fraction {kept:.4f}, expected ~{1 - p}"

    inputs = ln_inputs(dtype, shape[-1], shape=shape[:-1])
    outs = []
    for kind in ("cpp", "same", "fp64"):
        args = {k: leaf(v, torch.float64 if kind == "fp64" else None) for k, v in inputs.items()}
        if kind == "cpp":
            torch.manual_seed(seed)  # the same seed, so the same mask as recover_mask saw
            with fastbert.use_backend("cpp"):
                out = ops.add_layer_norm(args["x"], args["residual"], args["weight"], args["bias"], 1e-12,
                                         x_bias=args["x_bias"], dropout_p=p)
        else:
            out = masked_ref(args["x"], args["residual"], args["weight"], args["bias"], args["x_bias"], 1e-12,
                             keep, p)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype))
        outs.append((out, {k: v.grad for k, v in args.items()}))
    compare_all(outs, dtype)


@requires_ext
def test_dropout_is_reproducible_and_varies_with_seed():
    inputs = ln_inputs(torch.float32, 256, shape=(8,))
    call = ln_call(1e-5, dropout_p=0.2)
    with fastbert.use_backend("cpp"):
        torch.manual_seed(3)
        a = call(**inputs)
        torch.manual_seed(3)
        b = call(**inputs)
        c = call(**inputs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- torch.library registration

def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_bias_gelu(dtype):
    import fastbert.ops.extension.bias_gelu  # noqa: F401  (registers the ops)

    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    b = torch.randn(40, dtype=dtype, requires_grad=True)
    _opcheck(torch.ops.fastbert.extension_bias_gelu_fwd.default, (x, b, "none"))
    _opcheck(torch.ops.fastbert.extension_bias_gelu_fwd.default, (x, None, "tanh"))
    dy = torch.randn(3, 5, 40, dtype=dtype)
    _opcheck(torch.ops.fastbert.extension_bias_gelu_bwd.default, (dy, x.detach(), b.detach(), "none", True))


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_add_layer_norm(dtype):
    import fastbert.ops.extension.add_layer_norm  # noqa: F401  (registers the ops)

    args = ln_inputs(dtype, 48, shape=(3, 4))
    ts = {k: v.requires_grad_() for k, v in args.items()}
    op = torch.ops.fastbert.extension_add_layer_norm_fwd.default
    seed = torch.tensor([99])
    _opcheck(op, (ts["x"], ts["residual"], ts["weight"], ts["bias"], ts["x_bias"], 1e-12, 0.0, None))
    _opcheck(op, (ts["x"], None, ts["weight"], None, None, 1e-5, 0.25, seed))
    y, mean, rstd = op(*(t.detach() for t in ts.values()), 1e-12, 0.1, seed)
    _opcheck(torch.ops.fastbert.extension_add_layer_norm_bwd.default,
             (torch.randn_like(y), ts["x"].detach(), ts["residual"].detach(), ts["weight"].detach(),
              ts["x_bias"].detach(), mean, rstd, 0.1, seed, True))


@requires_ext
def test_torch_compile_has_no_graph_break():
    from fastbert.ops.extension.add_layer_norm import add_layer_norm_extension
    from fastbert.ops.extension.bias_gelu import bias_gelu_extension

    def f(x, b, r, w):
        return add_layer_norm_extension(bias_gelu_extension(x, b), r, w, None, 1e-12)

    args = (torch.randn(4, 32), torch.randn(32), torch.randn(4, 32), torch.randn(32))
    explanation = torch._dynamo.explain(f)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args))


# ---------------------------------------------------------------- validation

@requires_ext
def test_clear_errors_before_cpp():
    from fastbert.ops.extension.add_layer_norm import add_layer_norm_extension as add_layer_norm_compiled
    from fastbert.ops.extension.bias_gelu import bias_gelu_extension as bias_gelu_compiled

    with pytest.raises(ValueError, match="backend 'cpp' cannot take this call: it takes bfloat16, float32 inputs"):
        bias_gelu_compiled(torch.randn(2, 4, dtype=torch.float16), None)
    with pytest.raises(ValueError, match="bfloat16, float32"):
        bias_gelu_compiled(torch.randn(2, 4, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_gelu_compiled(torch.randn(2, 4), torch.randn(5))
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu_compiled(torch.randn(2, 4), None, "sigmoid")
    with pytest.raises(ValueError, match="residual must have the shape"):
        add_layer_norm_compiled(torch.randn(2, 4), torch.randn(3, 4), torch.ones(4), None, 1e-5)
    with pytest.raises(TypeError, match="residual must have the dtype"):
        add_layer_norm_compiled(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.bfloat16), torch.ones(4), None, 1e-5)
    with pytest.raises(ValueError, match="dropout_p"):
        add_layer_norm_compiled(torch.randn(2, 4), None, torch.ones(4), None, 1e-5, dropout_p=1.0)
    with pytest.raises(ValueError, match="the extension kernels run on CPU or CUDA"):
        bias_gelu_compiled(torch.randn(2, 4, device="meta"), None)


@requires_ext
def test_empty_inputs():
    with fastbert.use_backend("cpp"):
        x = torch.randn(0, 16, requires_grad=True)
        w = torch.ones(16, requires_grad=True)
        y = ops.add_layer_norm(x, None, w, None, 1e-5)
        y.sum().backward()
        assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))
        assert ops.bias_gelu(torch.randn(0, 8), torch.randn(8)).shape == (0, 8)


def test_missing_extension_leaves_torch_backend_working():
    code = textwrap.dedent("""
        import torch, fastbert
        from fastbert import ops
        reason = fastbert.available_backends()["cpp"]
        assert isinstance(reason, str) and "FASTBERT_NO_EXT" in reason, reason
        x = torch.randn(4, 8)
        y = ops.bias_gelu(x, torch.zeros(8))
        assert torch.allclose(y, torch.nn.functional.gelu(x))
        z = ops.add_layer_norm(x, None, torch.ones(8), None, 1e-5)
        assert torch.allclose(z, torch.nn.functional.layer_norm(x, (8,), eps=1e-5))
        try:
            with fastbert.use_backend("cpp"):
                ops.bias_gelu(x, None)
        except fastbert.BackendUnavailableError as exc:
            assert "FASTBERT_NO_EXT" in str(exc)
        else:
            raise AssertionError("backend cpp ran without the extension")
        print("ok")
    """)
    env = dict(os.environ, FASTBERT_NO_EXT="1")
    env.pop("FASTBERT_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_every_backend_registers_its_own_op_names():
    """torch.library lets a later custom_op silently replace one of the same name: every custom op of the
    Triton kernels and of the extension carries its backend's prefix, and no two share a name."""
    pytest.importorskip("triton", reason="triton is not installed")
    import importlib

    from torch._library.custom_ops import CustomOpDef

    prefixes = {"fastbert.kernels": "fastbert::triton_", "fastbert.ops.extension": "fastbert::extension_"}
    names = []
    for package, prefix in prefixes.items():
        for op in ("bias_gelu", "add_layer_norm", "attention"):
            if package.endswith("extension") and op == "attention":
                continue
            module = importlib.import_module(f"{package}.{op}")
            defined = [value._qualname for value in vars(module).values() if isinstance(value, CustomOpDef)]
            assert defined, f"{module.__name__} defines no custom op"
            assert all(name.startswith(prefix) for name in defined), defined
            names += defined
    assert len(names) == len(set(names)), sorted(names)


@requires_ext
def test_codes_come_from_the_extension():
    from fastbert import _C
    from fastbert.ops.extension import _common

    assert _common.dtype_code(torch.bfloat16) == _C.BFLOAT16 and _common.dtype_code(torch.float32) == _C.FLOAT32
    assert _common.gelu_code("tanh") == _C.GELU_TANH and _common.gelu_code("none") == _C.GELU_ERF
    assert _C.CUDA_MAX_LAYER_NORM_COLS == 8192  # kMaxLayerNormCols in csrc/include/fastbert_kernels.h


@requires_ext
def test_dropout_compiles_fullgraph_with_a_reproducible_seed():
    """The dropout seed is a CPU tensor from the one seed helper: no .item() in traced code."""
    x, w = torch.randn(4, 32), torch.ones(32)

    def f(x):
        return ops.add_layer_norm(x, None, w, None, 1e-5, dropout_p=0.5)

    compiled = torch.compile(f, fullgraph=True)
    with fastbert.use_backend("cpp"):
        torch.manual_seed(11)
        first = compiled(x)
        torch.manual_seed(11)
        again = compiled(x)
        later = compiled(x)
    assert torch.equal(first, again) and not torch.equal(first, later)


@requires_ext
def test_dispatcher_is_skipped_only_when_nothing_records_or_traces(monkeypatch):
    """Batch-1 latency: a call that autograd does not record runs the op's body directly (same checks,
    same kernel); a recorded call, or one under a dispatch mode, goes through the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastbert.ops.extension import add_layer_norm as module

    calls = []
    registered = module.add_layer_norm_fwd
    monkeypatch.setattr(module, "add_layer_norm_fwd", lambda *args: calls.append(1) or registered(*args))
    x, residual, weight, bias = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), torch.randn(16)
    direct = module.add_layer_norm_extension(x, residual, weight, bias, 1e-5)
    assert calls == []
    recorded = module.add_layer_norm_extension(x, residual, weight.requires_grad_(), bias, 1e-5)
    assert calls == [1] and recorded.requires_grad
    assert torch.equal(direct, recorded.detach())

    class SeenOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen: list[str] = []
    with torch.no_grad(), SeenOps():
        module.add_layer_norm_extension(x, residual, weight, bias, 1e-5)
    assert calls == [1, 1] and any("extension_add_layer_norm_fwd" in name for name in seen)
