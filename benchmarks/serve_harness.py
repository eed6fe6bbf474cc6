"""What serve_load.py's runs share: the seeded workload, the servers as subprocesses, the load clients
(async keep-alive and thread-per-request) and their summaries, the 1 x 16 latency probe and the overload run."""
from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

LEVELS = {1: 100, 8: 300, 64: 600}  # concurrency: requests
LEVEL_SECONDS = 40.0  # per server and level, over all rounds (serve_load.py --quick lowers it)
FP32_TOLERANCE = 1e-5
THREADS = 2
PEERS = str(Path(__file__).with_name("serve_peers.py"))


# ---- workload -------------------------------------------------------------------------------------


def _vocabulary_words(model_dir: str) -> list[str]:
    """Whole lowercase words of the vocabulary: each is one token, so a text of n words is n + 2 tokens."""
    words = Path(model_dir, "vocab.txt").read_text().split("\n")
    return [w for w in words if w.isalpha() and w.isascii() and w.islower() and len(w) > 2]


def make_requests(model_dir: str, count: int, seed: int, words_per_text=(3, 118)) -> list[list[str]]:
    rng = random.Random(seed)
    words = _vocabulary_words(model_dir)
    return [[" ".join(rng.choices(words, k=rng.randint(*words_per_text))) for _ in range(rng.randint(1, 4))]
            for _ in range(count)]


def references(model_dir: str, texts: list[str]) -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    unique = sorted(set(texts))
    values = SentenceTransformer(model_dir, device="cpu").encode(unique, batch_size=64)
    return dict(zip(unique, values))



def token_counts(model_dir: str, bodies: list[list[str]]) -> list[int]:
    """Tokens (special tokens included, truncated at the model's limit) of each request body."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [sum(map(len, tokenizer(texts, truncation=True)["input_ids"])) for texts in bodies]


# ---- servers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(name: str, model_dir: str, port: int, openvino_python: str | None,
                   queue: int) -> list[str] | None:
    fastbert = [sys.executable, "-m", "fastbert", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                "--threads", str(THREADS), "--log-level", "warning", "--max-concurrent-requests", str(queue)]
    commands = {
        "fastbert": fastbert,
        "fastbert-nobatch": [*fastbert, "--no-batching"],
        "fastbert-bf16": [*fastbert, "--dtype", "bf16"],
        # one intra-op thread: the other core left to the event loop, tokenization and a same-machine client
        "fastbert-1thread": [*fastbert, "--threads", "1"],
        # before issue 35: fp32 always, OpenMP and tokenizers left to their own waiting and threads
        "fastbert-before": [*fastbert, "--dtype", "fp32", "--no-thread-env"],
        "st": [sys.executable, PEERS, model_dir, "--port", str(port), "--backend", "torch", "--threads", str(THREADS)],
    }
    if openvino_python:
        commands["st-openvino"] = [openvino_python, PEERS, model_dir, "--port", str(port),
                                   "--backend", "openvino", "--threads", str(THREADS)]
        # the same app on OpenVINO directly (OpenVINOEncoder): needs only the openvino package
        commands["ov-direct"] = [openvino_python, PEERS, model_dir, "--port", str(port),
                                 "--backend", "openvino-direct", "--threads", str(THREADS)]
    return commands.get(name)


class Server:
    def __init__(self, command: list[str], port: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server not healthy")

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---- load -----------------------------------------------------------------------------------------


async def async_load(url: str, work: list[tuple[int, list[str]]], concurrency: int, seconds: float) -> dict:
    """Send `work` ((index, texts) pairs) with `concurrency` clients, stopping after `seconds`."""
    import httpx
    import orjson

    results: list[dict] = []
    pending = iter(work)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client):
        for index, texts in pending:
            if time.perf_counter() > deadline:
                return
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/embed", json={"inputs": texts})
                status, content = response.status_code, response.content
            except httpx.TransportError as exc:
                status, content = f"transport error: {type(exc).__name__}", b""
            results.append({"index": index, "status": status, "latency": time.perf_counter() - started,
                            "rows": orjson.loads(content) if status == 200 else None})

    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return {"results": results, "elapsed": time.perf_counter() - started}


def threaded_load(url: str, work: list[tuple[int, list[str]]], threads: int, seconds: float) -> dict:
    """Send `work` from `threads` threads, each request on a new connection (what a naive client does)."""
    import http.client

    import orjson

    host, port = url.removeprefix("http://").split(":")
    results: list[dict] = []
    pending, lock = iter(work), threading.Lock()
    deadline = time.perf_counter() + seconds

    def post(texts: list[str]) -> tuple:
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request("POST", "/embed", orjson.dumps({"inputs": texts}),
                               {"content-type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        except OSError as exc:
            return f"transport error: {type(exc).__name__}", b""
        finally:
            connection.close()

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                index, texts = next(pending, (None, None))
            if index is None:
                return
            started = time.perf_counter()
            status, content = post(texts)
            results.append({"index": index, "status": status, "latency": time.perf_counter() - started,
                            "rows": orjson.loads(content) if status == 200 else None})

    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"results": results, "elapsed": time.perf_counter() - started}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _wrong_rows(ok: list[dict], bodies: list[list[str]], refs: dict) -> tuple[int, float]:
    """Rows that are not the reference embedding of their own text (lost, duplicated, misordered)."""
    wrong, max_error = 0, 0.0
    for result in ok:
        texts = bodies[result["index"]]
        rows = np.asarray(result["rows"], dtype=np.float64)
        expected = np.stack([refs[text] for text in texts]).astype(np.float64)
        if rows.shape != expected.shape:
            wrong += len(texts)
            continue
        errors = np.abs(rows - expected).max(axis=1)
        max_error = max(max_error, float(errors.max()))
        wrong += int((errors > FP32_TOLERANCE).sum())
    return wrong, max_error


def summarize(runs: list[dict], bodies: list[list[str]], refs: dict | None, tokens: list[int] | None = None) -> dict:
    results = [result for run in runs for result in run["results"]]
    elapsed = sum(run["elapsed"] for run in runs)
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency"] * 1000 for r in ok]
    summary = {
        "requests": len(results), "ok": len(ok), "statuses": sorted({str(r["status"]) for r in results}),
        "requests_per_s": len(ok) / elapsed, "embeddings_per_s": sum(len(bodies[r["index"]]) for r in ok) / elapsed,
        "p50_ms": _percentile(latencies, 50), "p90_ms": _percentile(latencies, 90),
        "p99_ms": _percentile(latencies, 99), "seconds": elapsed,
    }
    if tokens is not None:
        summary["tokens_per_s"] = sum(tokens[r["index"]] for r in ok) / elapsed
    if refs is not None:
        summary["rows_wrong"], summary["max_abs_error"] = _wrong_rows(ok, bodies, refs)
    return summary


def latency_probe(url: str, model_dir: str, repeats: int = 60) -> dict:
    """1 x 16-token requests at concurrency 1 and a bare fastbert forward of 1 x 16 tokens (+ mean
    pooling) in this process, alternating, so both see the same machine load."""
    import httpx
    import torch
    from transformers import AutoTokenizer

    import fastbert

    torch.set_num_threads(THREADS)
    model = fastbert.BertModel.from_pretrained(model_dir).eval()
    text = " ".join(["serve"] * 14)
    batch = AutoTokenizer.from_pretrained(model_dir)([text], return_tensors="pt")
    assert batch["input_ids"].shape == (1, 16), batch["input_ids"].shape
    bare, served = [], []
    with torch.inference_mode(), httpx.Client(timeout=60) as client:
        for _ in range(repeats + 5):
            started = time.perf_counter()
            model(**batch).last_hidden_state.mean(1)
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert client.post(f"{url}/embed", json={"inputs": [text]}).status_code == 200
            served.append(time.perf_counter() - started)
    return {"bare_forward_p50_ms": statistics.median(bare[5:]) * 1000,
            "request_p50_ms": statistics.median(served[5:]) * 1000, "repeats": repeats}


def overload_run(url: str, server: Server, queue: int, rounds: int, body: list[str]) -> dict:
    statuses: dict[str, int] = {}
    rss = [server.rss_mib()]
    deadline = time.perf_counter() + LEVEL_SECONDS
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            break
        run = asyncio.run(async_load(url, [(0, body)] * (2 * queue), 2 * queue, LEVEL_SECONDS))
        for result in run["results"]:
            statuses[str(result["status"])] = statuses.get(str(result["status"]), 0) + 1
        rss.append(server.rss_mib())
    return {"queue": queue, "concurrency": 2 * queue, "statuses": statuses, "rss_mib": rss,
            "only_200_and_429": set(statuses) <= {"200", "429"}}



def load_average() -> list[float]:
    return list(os.getloadavg())


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


CLIENTS = {"async1": lambda url, work: asyncio.run(async_load(url, work, 1, LEVEL_SECONDS)),
           "async8": lambda url, work: asyncio.run(async_load(url, work, 8, LEVEL_SECONDS)),
           "async64": lambda url, work: asyncio.run(async_load(url, work, 64, LEVEL_SECONDS)),
           "threads16": lambda url, work: threaded_load(url, work, 16, LEVEL_SECONDS)}


def write_record(path: str | None, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
