"""`fastbert serve` as a command: argument errors in one line, and SIGTERM in a real server process
(127.0.0.1 only): new connections are refused, every accepted request is answered, the process exits."""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fastbert.cli import main
from fastbert.serve.workers import core_slices
from tests.serve._control import free_port, wait_healthy

SLOW_SERVER = Path(__file__).with_name("_slow_server.py")
FORWARD_DELAY = 0.4


def test_serve_help_lists_the_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option's help
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for option in ("--max-batch-tokens", "--max-concurrent-requests", "--max-client-batch-size",
                   "--max-input-length", "--api-key", "--workers", "--dtype", "--port", "--host", "--model-id",
                   "--hostname", "--served-model-name", "--revision", "--default-prompt-name",
                   "(default: 16384) [env: MAX_BATCH_TOKENS]"):
        assert option in text


def test_errors_are_one_line_and_exit_1(embed_dir, tmp_path, capsys):
    assert main(["serve", embed_dir, "--dtype", "int8"]) == 1
    assert "--dtype int8 needs --calibration FILE" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["serve", embed_dir, "--max-batch-tokens", "0"]) == 1
    assert "--max-batch-tokens 0" in capsys.readouterr().err


def test_core_slices_cover_every_core_once():
    assert core_slices(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert core_slices([0, 1], 4) == [[0], [1], [0], [1]]  # more workers than cores: shared


def _in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("fastbert_requests_in_flight ")))


@pytest.mark.slow
def test_sigterm_drains_accepted_requests_then_exits(embed_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, str(SLOW_SERVER), str(FORWARD_DELAY), embed_dir, "--host",
                                "127.0.0.1", "--port", str(port), "--max-batch-tokens", "64",
                                "--log-level", "warning"])
    try:
        wait_healthy(url, process)
        texts = [" ".join([f"word{i}"] * 20) for i in range(5)]  # each ~40 tokens: one forward each
        with ThreadPoolExecutor(len(texts)) as pool:
            futures = [pool.submit(httpx.post, f"{url}/embed", json={"inputs": text}, timeout=120) for text in texts]
            deadline = time.monotonic() + 60
            while _in_flight(url) < len(texts):
                assert time.monotonic() < deadline, "the requests never reached the server"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the listener closes at once; the queued forwards take ~2 s more
            with pytest.raises(httpx.TransportError):
                httpx.post(f"{url}/embed", json={"inputs": "too late"}, timeout=5)
            responses = [future.result() for future in futures]
        assert [response.status_code for response in responses] == [200] * len(texts)
        assert all(len(response.json()) == 1 and len(response.json()[0]) == 32 for response in responses)
        # uvicorn re-raises the signal once the shutdown is complete, so supervisors see a SIGTERM exit
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def spawned_workers(parent: int) -> list[int]:
    """The pids of `parent`'s multiprocessing-spawned children (uvicorn's workers; not the resource tracker)."""
    workers = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"multiprocessing.spawn" in command:
            workers.append(int(entry.name))
    return workers


@pytest.mark.slow
def test_workers_share_the_port_and_pin_their_cores(embed_dir, tmp_path):
    if not hasattr(os, "sched_getaffinity") or not Path("/proc/self/stat").exists():
        pytest.skip("reading other processes' CPU affinity needs Linux (/proc and sched_getaffinity)")
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip(f"2 workers cannot have cores of their own on {len(cores)} usable core")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "fastbert", "serve", embed_dir, "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "2", "--log-level", "warning"])
    try:
        wait_healthy(url, process)
        responses = [httpx.post(f"{url}/embed", json={"inputs": ["worker", "pinned"]}, timeout=60) for _ in range(4)]
        assert all(response.status_code == 200 and len(response.json()) == 2 for response in responses)
        # Each worker is pinned to its own half of the server's cores: disjoint, together all of them.
        workers = spawned_workers(process.pid)
        assert len(workers) == 2, f"expected 2 worker processes under {process.pid}, found {workers}"
        pinned = [os.sched_getaffinity(pid) for pid in workers]
        assert not pinned[0] & pinned[1], f"workers share cores: {pinned}"
        assert pinned[0] | pinned[1] == os.sched_getaffinity(process.pid), f"{pinned} do not cover the cores"
        assert abs(len(pinned[0]) - len(pinned[1])) <= 1, pinned
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
