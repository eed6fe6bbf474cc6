"""The README and the task docs run as written.

Every ```python block of README.md and the pages in DOCS runs in a fresh Python process, from an empty folder,
offline, and must exit 0. A block whose first line is `# examples/NAME.py` must be that file byte for byte, so the
runnable copies in examples/ cannot drift from the docs, and every file in examples/ but the ones in
NOT_IN_DOCS is shown in a doc. The README's serving block (`fastbert serve` + curl) runs in bash on a free port.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/install.md", "docs/embeddings.md", "docs/models.md", "docs/fine-tuning.md",
        "docs/cpu-inference.md", "docs/pretraining.md", "docs/benchmarks.md"]
NOT_IN_DOCS = {"examples/finetune_classifier.py"}  # a command-line script, shown as its command in pretraining.md
TIMEOUT_S = 900
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.M | re.S)
EXAMPLE = re.compile(r"# (examples/[\w.-]+\.py)\b")


def _blocks(language: str) -> list[tuple[str, str]]:
    """(where, code) of every fenced block in `language`, where = "README.md:LINE"."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                found.append((f"{doc}:{text.count(chr(10), 0, match.start()) + 1}", match.group(2)))
    return found


def _example_of(code: str) -> str | None:
    match = EXAMPLE.match(code)
    return match.group(1) if match else None


def _python_params() -> list:
    by_code: dict[str, list[str]] = {}
    for where, code in _blocks("python"):
        by_code.setdefault(code, []).append(where)  # a snippet shown on two pages runs once
    params = []
    for code, places in by_code.items():
        params.append(pytest.param(code, id=_example_of(code) or places[0]))
    return params


def _environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run in its own process group, so that a timeout also ends anything it started (a server)."""
    process = subprocess.Popen(command, cwd=cwd, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_the_docs_have_python_examples():
    assert len(_python_params()) >= 10
    for doc in DOCS:
        assert (ROOT / doc).is_file(), doc


@pytest.mark.parametrize("code", _python_params())
def test_python_block_is_its_example_file(code):
    example = _example_of(code)
    if example is None:
        pytest.skip("a block without an examples/ file")
    assert (ROOT / example).read_text() == code, f"{example} and its copy in the docs differ"


def test_every_example_file_is_shown_in_a_doc():
    shown = {_example_of(code) for _, code in _blocks("python")}
    files = {str(path.relative_to(ROOT)) for path in (ROOT / "examples").glob("*.py")}
    assert files - NOT_IN_DOCS <= shown, f"not in any doc: {sorted(files - NOT_IN_DOCS - shown)}"


@pytest.mark.parametrize("code", _python_params())
def test_python_block_runs(code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    result = _run([sys.executable, str(script)], cwd=tmp_path)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def test_readme_serve_block_runs(tmp_path):
    blocks = [code for where, code in _blocks("bash") if where.startswith("README.md") and "fastbert serve" in code]
    assert len(blocks) == 1, "the README has one block that starts fastbert serve"
    port = str(_free_port())
    lines = [line for line in blocks[0].splitlines() if not line.startswith("pip install")]  # the test extra has it
    script = "set -euo pipefail\n" + "\n".join(lines).replace("8080", port) + "\n"
    result = _run(["bash", "-c", script], cwd=tmp_path)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert re.search(r"\[\[-?[0-9]", result.stdout), result.stdout[-2000:]  # /embed answered with vectors
