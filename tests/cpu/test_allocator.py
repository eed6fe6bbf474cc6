"""fastbert.keep_freed_memory (fastbert/cpu/allocator.py): glibc told to keep what a forward frees.

The mechanism is checked by what it is for: a loop that allocates, fills and frees a 64 MiB tensor faults every
page in again each time under glibc's default (the block is mmapped and unmapped), and not once the memory is
kept. Each case runs in its own process, because the setting lasts for a process's life."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from fastbert.cpu import allocator

pytestmark = pytest.mark.skipif(allocator.problem() is not None, reason=f"not glibc: {allocator.problem()}")

BLOCK_PAGES = 64 * 2**20 // 4096  # a 64 MiB fp32 tensor's 4 KiB pages: over glibc's largest mmap threshold

FAULTS_PER_BLOCK = textwrap.dedent("""
    import json, resource, sys
    import torch
    import fastbert
    if sys.argv[1] == "keep":
        fastbert.keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # settle: the first blocks are faulted in under any setting
        torch.ones(16 * 2**20)
    before = faults()
    for _ in range(10):
        torch.ones(16 * 2**20)  # allocated, every page written, freed
    print(json.dumps({"faults_per_block": (faults() - before) / 10, "kept": fastbert.cpu.allocator.is_kept()}))
""")


def _python(code: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != allocator.ENVIRONMENT_VARIABLE}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**environment, **(env or {})}, timeout=300)


def _faults(setting: str, env: dict | None = None) -> dict:
    done = _python(FAULTS_PER_BLOCK, setting, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_glibc_default_faults_every_large_block_in_again():
    result = _faults("default")
    assert not result["kept"]
    assert result["faults_per_block"] > BLOCK_PAGES / 2, result  # the baseline the next test improves on


def test_kept_memory_is_reused_without_faults():
    result = _faults("keep")
    assert result["kept"]
    assert result["faults_per_block"] < BLOCK_PAGES / 100, result


def test_the_environment_variable_keeps_it_at_import():
    result = _faults("default", env={allocator.ENVIRONMENT_VARIABLE: "1"})
    assert result["kept"] and result["faults_per_block"] < BLOCK_PAGES / 100, result
    assert not _faults("default", env={allocator.ENVIRONMENT_VARIABLE: "0"})["kept"]


def test_a_bad_value_of_the_variable_is_named():
    done = _python("import fastbert", env={allocator.ENVIRONMENT_VARIABLE: "maybe"})
    assert done.returncode == 1
    assert f"{allocator.ENVIRONMENT_VARIABLE}='maybe' is not a boolean" in done.stderr


def test_without_glibc_it_says_why_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: (None, "the C library here is not glibc (Darwin unknown)"))
    monkeypatch.setattr(allocator, "_kept", False)
    with pytest.raises(RuntimeError, match="keep_freed_memory: the C library here is not glibc"):
        allocator.keep_freed_memory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert allocator.keep_if_possible("--keep-freed-memory") is False
    assert "--keep-freed-memory asks to keep freed memory, but" in str(caught[0].message)
    assert not allocator.is_kept() and "not glibc" in allocator.state()
