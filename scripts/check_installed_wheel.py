"""Checks an installed fastbert as a user gets it: from a wheel, in a fresh venv, outside the checkout.

    cd $(mktemp -d) && VENV/bin/python CHECKOUT/scripts/check_installed_wheel.py --checkout CHECKOUT [--expect-cuda]

1. `import fastbert` finds the installed package, not the checkout.
2. The installed files (importlib.metadata) hold every module of the checkout's fastbert/ and kernels/
   (as fastbert/kernels/, never a top-level `kernels`) and the compiled fastbert._C, and fastbert._C_cuda
   with --expect-cuda. With --sdist-wheel W (a wheel built from the sdist), W holds the same files.
3. fastbert._C loads, and the "cpp" backend is available.
4. A padded forward of a small random-init BertModel gives the same hidden states on the "cpp" and
   "torch" backends (fp32, real tokens, max abs difference <= TOLERANCE).
5. The installed `fastbert info` console script exits 0.
Exits 1 with the failed check named. .ci/run runs it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path

# fp32, hidden 64: the two backends differ by summation order only (measured 4.8e-7 here)
TOLERANCE = 1e-5


def check_imported_from_outside(checkout: Path) -> None:
    import fastbert

    location = Path(fastbert.__file__).resolve()
    if location.is_relative_to(checkout):
        raise SystemExit(f"FAIL: fastbert was imported from the checkout ({location}), not the installed wheel")
    print(f"ok: fastbert {fastbert.__version__} imported from {location.parent}")


def expected_files(checkout: Path, expect_cuda: bool) -> set[str]:
    modules = {path.relative_to(checkout).as_posix() for path in (checkout / "fastbert").rglob("*.py")}
    modules |= {"fastbert/kernels/" + path.relative_to(checkout / "kernels").as_posix()
                for path in (checkout / "kernels").rglob("*.py")}
    extension_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    modules.add(f"fastbert/_C{extension_suffix}")
    if expect_cuda:
        modules.add(f"fastbert/_C_cuda{extension_suffix}")
    return modules


def installed_files() -> set[str]:
    return {file.as_posix() for file in importlib.metadata.files("fastbert")}


def check_installed_files(checkout: Path, expect_cuda: bool) -> None:
    installed = installed_files()
    expected = expected_files(checkout, expect_cuda)
    missing = sorted(expected - installed)
    if missing:
        raise SystemExit(f"FAIL: the wheel lacks {len(missing)} file(s) of the checkout: {missing}")
    top_level_kernels = sorted(name for name in installed if name.startswith("kernels/"))
    if top_level_kernels:
        raise SystemExit(f"FAIL: the wheel installs a top-level kernels package: {top_level_kernels}")
    print(f"ok: the wheel holds all {len(expected)} expected modules and extensions, no top-level kernels")


def check_sdist_wheel(wheel: Path) -> None:
    """The wheel built from the sdist holds the same package files as the installed wheel."""
    import zipfile

    def package_files(names) -> set[str]:
        return {name for name in names if name.startswith("fastbert/") and not name.endswith(".pyc")}

    from_sdist = package_files(zipfile.ZipFile(wheel).namelist())
    installed = package_files(installed_files())
    if from_sdist != installed:
        raise SystemExit(f"FAIL: the wheel built from the sdist differs: only in it {sorted(from_sdist - installed)}, "
                         f"only in the installed wheel {sorted(installed - from_sdist)}")
    print(f"ok: the wheel built from the sdist holds the same {len(from_sdist)} files")


def check_extension_loaded() -> None:
    import fastbert
    from fastbert import extension

    problem = extension.load_problem()
    if problem is not None:
        raise SystemExit(f"FAIL: the compiled extension did not load: {problem}")
    cpp = fastbert.available_backends()["cpp"]
    if cpp is not True:
        raise SystemExit(f"FAIL: the cpp backend is unavailable: {cpp}")
    print(f"ok: fastbert._C loaded from {Path(sys.modules['fastbert._C'].__file__).name}; cpp backend available")


def padded_batch(vocab_size: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    lengths = [13, 5, 9]
    input_ids = torch.randint(1, vocab_size, (len(lengths), max(lengths)), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    return input_ids * attention_mask, attention_mask


def check_cpp_matches_torch() -> None:
    import torch
    import transformers

    import fastbert

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    model = fastbert.BertModel(config).eval()
    input_ids, attention_mask = padded_batch(config.vocab_size)
    outputs = {}
    for backend in ("cpp", "torch"):
        with torch.no_grad(), fastbert.use_backend(backend):
            outputs[backend] = model(input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    difference = (outputs["cpp"][real] - outputs["torch"][real]).abs().max().item()
    if not difference <= TOLERANCE:
        raise SystemExit(f"FAIL: padded forward, cpp vs torch backend: max abs difference {difference:.3g} "
                         f"> {TOLERANCE}")
    print(f"ok: padded forward (3 rows, lengths 13/5/9), cpp vs torch backend: max abs difference "
          f"{difference:.3g} <= {TOLERANCE}")


def check_info_command() -> None:
    script = Path(sys.executable).parent / "fastbert"  # the console script the wheel installed
    done = subprocess.run([str(script), "info"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"FAIL: fastbert info exited {done.returncode}: {done.stderr[-2000:]}")
    print("ok: fastbert info\n" + "\n".join("    " + line for line in done.stdout.splitlines()[:12]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, type=Path, help="the source tree the wheel was built from")
    parser.add_argument("--expect-cuda", action="store_true", help="the wheel must hold fastbert._C_cuda")
    parser.add_argument("--sdist-wheel", type=Path, help="a wheel built from the sdist, to compare")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    check_imported_from_outside(checkout)
    check_installed_files(checkout, args.expect_cuda)
    if args.sdist_wheel:
        check_sdist_wheel(args.sdist_wheel)
    check_extension_loaded()
    check_cpp_matches_torch()
    check_info_command()
    print("check_installed_wheel: all checks passed")


if __name__ == "__main__":
    main()
