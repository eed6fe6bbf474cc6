"""The backend switch and the capability registry: selection, resolution as pure logic, reasons."""

import ast
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert import backend, extension
from fastbert.cpu import machine
from fastbert.registry import BackendUnavailableError, Implementation, Registry, Signature

REPO = Path(__file__).resolve().parents[2]
requires_ext = pytest.mark.skipif(extension.load_problem() is not None, reason=f"{extension.load_problem()}")


@pytest.fixture(autouse=True)
def restore_process_backend():
    before = fastbert.current_backend()
    yield
    fastbert.use_backend(before)


# ------------------------------------------------------------------ selection

def test_setter_is_process_wide_and_a_block_is_scoped():
    fastbert.use_backend("torch")
    assert fastbert.current_backend() == "torch"
    with fastbert.use_backend("auto"):
        assert fastbert.current_backend() == "auto"
        with fastbert.use_backend("torch"):
            assert fastbert.current_backend() == "torch"
        assert fastbert.current_backend() == "auto"
    assert fastbert.current_backend() == "torch"


def test_decorator_selects_on_each_call_and_restores_after():
    fastbert.use_backend("auto")
    seen = []

    @fastbert.use_backend("torch")
    def run():
        seen.append(fastbert.current_backend())

    assert fastbert.current_backend() == "auto", "decorating must not change the selection"
    run()
    fastbert.use_backend("cpp")  # the process selection moves on between calls
    run()
    assert seen == ["torch", "torch"]
    assert fastbert.current_backend() == "cpp"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'cuda', 'cpp', 'onednn', "
                                         r"'auto'\), got 'tpu'"):
        fastbert.use_backend("tpu")


def test_available_backends_give_true_or_a_reason():
    status = fastbert.available_backends()
    assert set(status) == set(backend.BACKENDS)
    for name, value in status.items():
        assert value is True or (isinstance(value, str) and value), name
    assert status["torch"] is True and status["auto"] is True
    if not torch.cuda.is_available():
        assert status["cuda"] == "no CUDA device"


# ------------------------------------------------------------------ resolution as pure logic

# The capabilities the matrix expects, written out independently of the registrations:
# backend -> (ops, device types, dtypes), plus per-call size limits.
ROW_OPS = ("bias_gelu", "add_layer_norm")
ATTENTION_OPS = ("attention", "varlen_attention")
HALF_AND_FLOAT = {torch.float32, torch.float16, torch.bfloat16}
EXPECTED_CAPABILITIES = {
    "triton": (set(ROW_OPS + ATTENTION_OPS), {"cuda"}, HALF_AND_FLOAT),
    "cuda": (set(ROW_OPS), {"cuda"}, HALF_AND_FLOAT),
    "cpp": (set(ROW_OPS) | {"varlen_attention"}, {"cpu"}, {torch.float32, torch.bfloat16}),
}
SIZE_LIMITS = {("triton", "add_layer_norm"): 4096, ("cuda", "add_layer_norm"): 8192,
               ("triton", "attention"): 128, ("triton", "varlen_attention"): 128}
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}
# Registered but not chosen by "auto" on this CPU (measured slower than torch there; docs/perf-notes.md):
# the cpp varlen attention on CPUs with AMX.
AUTO_NEVER = {("cpp", "varlen_attention", "cpu")} if machine.machine().amx_bf16 else set()


def _can_run(name, op, device, dtype, size):
    ops, devices, dtypes = EXPECTED_CAPABILITIES[name]
    limit = SIZE_LIMITS.get((name, op), float("inf"))
    return op in ops and device in devices and dtype in dtypes and size <= limit


def _expected(requested, op, device, dtype, size):
    """The backend that should run the call, or BackendUnavailableError."""
    if requested == "torch":
        return "torch"
    if requested != "auto" and op in EXPECTED_CAPABILITIES[requested][0]:
        return requested if _can_run(requested, op, device, dtype, size) else BackendUnavailableError
    choices = [name for name in AUTO_ORDER[device] if (name, op, device) not in AUTO_NEVER]
    return next((name for name in choices if _can_run(name, op, device, dtype, size)), "torch")


def _signature(op, device, dtype, size):
    if op in ATTENTION_OPS:
        return Signature(op, device, dtype, head_dim=size)
    return Signature(op, device, dtype, width=size)


@pytest.fixture(scope="module")
def everything_present():
    """The real registrations, with probes that report every backend's code and device as present."""
    return backend.REGISTRY.with_probe(lambda device: None)


CASES = list(itertools.product(
    ROW_OPS + ATTENTION_OPS, ("cpu", "cuda"), (torch.float32, torch.float16, torch.bfloat16, torch.float64),
))


@requires_ext  # the CUDA LayerNorm's limit is read from fastbert._C
@pytest.mark.parametrize("op, device, dtype", CASES, ids=str)
def test_resolution_matrix_explicit_and_auto(everything_present, op, device, dtype):
    sizes = (64, 128, 129, 256) if op in ATTENTION_OPS else (768, 4096, 4097, 8192, 8193)
    for requested, size in itertools.product(("torch", "triton", "cuda", "cpp", "auto"), sizes):
        expected = _expected(requested, op, device, dtype, size)
        call = _signature(op, device, dtype, size)
        where = f"{requested} {op} {device} {dtype} size {size}"
        if expected is BackendUnavailableError:
            with pytest.raises(BackendUnavailableError, match=f"backend '{requested}' cannot run {op}"):
                everything_present.resolve(requested, call)
        else:
            assert everything_present.resolve(requested, call).backend == expected, where


@requires_ext
def test_cuda_auto_falls_back_past_the_kernels_limits(everything_present):
    """The two cases where "auto" on CUDA used to raise: LayerNorm rows wider than the CUDA kernel's
    8192, and attention with head_dim > 128 (unknown to the old resolver)."""
    wide = Signature("add_layer_norm", "cuda", torch.float16, width=8193)
    assert everything_present.resolve("auto", wide).backend == "torch"
    with pytest.raises(BackendUnavailableError, match="rows of at most 8192 elements, got 8193"):
        everything_present.resolve("cuda", wide)
    big_heads = Signature("attention", "cuda", torch.float16, head_dim=256)
    assert everything_present.resolve("auto", big_heads).backend == "torch"
    with pytest.raises(BackendUnavailableError, match="head_dim up to 128, got 256"):
        everything_present.resolve("triton", big_heads)


@requires_ext
def test_cuda_layer_norm_limit_is_read_from_the_extension(everything_present, monkeypatch):
    class SmallerKernel:
        CUDA_MAX_LAYER_NORM_COLS = 100

    monkeypatch.setattr(extension, "module", lambda: SmallerKernel)
    everything_present.clear_cache()
    with pytest.raises(BackendUnavailableError, match="at most 100 elements, got 101"):
        everything_present.resolve("cuda", Signature("add_layer_norm", "cuda", torch.float32, width=101))


def test_triton_on_cpu_only_in_the_interpreter(everything_present):
    interpreted = Signature("attention", "cpu", torch.float32, head_dim=64, interpreting=True)
    assert everything_present.resolve("triton", interpreted).backend == "triton"
    assert everything_present.resolve("auto", interpreted).backend == "torch", "auto never picks the interpreter"
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        everything_present.resolve("triton", interpreted._replace(interpreting=False))


def test_a_failing_probe_refuses_explicit_and_steers_auto():
    registry = Registry({"cpu": {"op": ("fast", "torch")}})
    registry.register(Implementation("op", "torch", "m:ref", None, None, probe=lambda device: None))
    registry.register(Implementation("op", "fast", "m:fast", frozenset({"cpu"}), frozenset({torch.float32}),
                                     probe=lambda device: "the fast library is missing"))
    call = Signature("op", "cpu", torch.float32)
    assert registry.resolve("auto", call).backend == "torch"
    with pytest.raises(BackendUnavailableError, match="backend 'fast' cannot run op on cpu: the fast library"):
        registry.resolve("fast", call)
    assert registry.availability("fast", interpreting=False) == "the fast library is missing"
    assert registry.availability("slow", interpreting=False) == "no op is registered for backend 'slow'"


def test_auto_skips_backends_without_a_registration():
    registry = Registry({"cpu": {"op": ("unregistered", "torch")}})
    registry.register(Implementation("op", "torch", "m:ref", None, None, probe=lambda device: None))
    assert registry.resolve("auto", Signature("op", "cpu", torch.float32)).backend == "torch"


def test_an_explicit_backend_without_the_op_runs_the_auto_choice():
    with fastbert.use_backend("cpp"):
        q = torch.randn(1, 2, 3, 8)
        assert backend.resolved_backend("attention", q, head_dim=8) == "torch"


def test_registering_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        backend.REGISTRY.register(backend.REGISTRY.get("bias_gelu", "torch"))


def test_cpu_varlen_attention_order_follows_the_cpu(pretend_machine):
    """SDPA per sequence on an AMX CPU, the cpp kernel first elsewhere (each measured faster there)."""
    for features, expected in ((["avx512f", "amx_bf16"], ("torch",)), (["avx512f", "avx512_bf16"], ("cpp", "torch")),
                               ([], ("cpp", "torch"))):
        pretend_machine(features)
        assert backend.REGISTRY.auto_order("varlen_attention", "cpu") == expected


def test_every_auto_choice_names_a_known_backend():
    for device in backend.AUTO_PREFERENCE:
        for op in backend.AUTO_PREFERENCE[device]:
            order = backend.REGISTRY.auto_order(op, device)
            assert order[-1] == "torch", (device, op)
            assert set(order) <= set(backend.BACKENDS), (device, op, order)


# ------------------------------------------------------------------ structure

def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_kernels_own_their_limits():
    """Nothing under kernels/ reads limits (or anything else) from fastbert.backend."""
    for path in sorted((REPO / "kernels").glob("*.py")):
        assert not any(name.startswith("fastbert.backend") for name in _imported_modules(path)), path.name


def test_importing_fastbert_imports_no_implementation_module():
    """Implementations load on first use (torch itself may import triton; fastbert's kernels wait)."""
    code = textwrap.dedent("""
        import sys, fastbert, fastbert.ops
        loaded = [name for name in ("fastbert.ops.extension.bias_gelu", "fastbert.kernels.attention")
                  if name in sys.modules]
        print("loaded:", loaded)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout, done.stdout


def test_compile_fullgraph_in_a_fresh_process():
    """The first resolution and the lazy import of an implementation happen while dynamo traces."""
    code = textwrap.dedent("""
        import torch, fastbert
        from fastbert import ops

        def f(x, b, w, mask):
            h = ops.add_layer_norm(ops.bias_gelu(x, b), x, w, None, 1e-5)
            q = h.view(2, 4, 2, 8).transpose(1, 2)
            return ops.attention(q, q, q, mask)

        args = (torch.randn(8, 16), torch.randn(16), torch.ones(16), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
        compiled = torch.compile(f, fullgraph=True)
        torch.testing.assert_close(compiled(*args), f(*args))
        with fastbert.use_backend("torch"):
            torch.testing.assert_close(compiled(*args), f(*args))
        print("ok")
    """)
    env = {key: value for key, value in os.environ.items() if key != "FASTBERT_BACKEND"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_interpreter_flag_is_parsed_in_one_place(monkeypatch):
    from fastbert.kernels.host import triton_interpreting

    for value, expected in (("1", True), ("0", False), ("", False), ("true", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreting() is expected, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_interpreting() is False


def test_interpreter_flag_is_read_at_the_first_resolution_only():
    """TRITON_INTERPRET counts as set before fastbert's first op call, and later changes do not
    (Triton fixes interpretation when a kernel module is imported, so fastbert reads the flag once)."""
    code = textwrap.dedent("""
        import os, torch, fastbert
        from fastbert import backend
        os.environ["TRITON_INTERPRET"] = "1"  # after import, before the first call: counts
        first = backend.resolved_backend("bias_gelu", torch.randn(2, 4), width=4)
        os.environ["TRITON_INTERPRET"] = "0"  # after the first call: ignored
        print("interpreting:", backend.interpreting(), backend.backend_problem("triton", "cpu") is None)
    """)
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "FASTBERT_BACKEND")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreting: True True" in done.stdout, done.stdout
