"""serve_load.py --alone: each server alone in its turn, rounds rotated, against fastbert's raw batch rate."""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import serve_harness
from serve_harness import (
    CLIENTS,
    THREADS,
    Server,
    async_load,
    free_port,
    load_average,
    machine,
    make_requests,
    references,
    server_command,
    summarize,
    token_counts,
    write_record,
)

SERVE_LOAD = str(Path(__file__).with_name("serve_load.py"))  # the children run through its command line
RAW = "fastbert-raw"  # not a server: fastbert's raw batch rate on the same texts, in its own process, in its turn
RAW_BATCH = 32

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


def _child(command: list[str]) -> dict:
    """A child run with the server's thread environment (passive OpenMP waits), so that the bare
    forward and the raw rate run as the server's forwards do: a process whose idle OpenMP threads spin would
    lose cores to the server between its forwards."""
    from fastbert.serve.cli import THREAD_ENVIRONMENT

    env = {**os.environ, **THREAD_ENVIRONMENT, "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _probe_turn(url: str, args) -> dict:
    return _child([sys.executable, SERVE_LOAD, "--probe-child", url, "--model", args.model])


def _raw_turn(args) -> dict:
    return _child([sys.executable, SERVE_LOAD, "--raw-child", "--model", args.model, "--requests", str(args.requests),
                   "--seed", str(args.seed), "--raw-passes", str(args.raw_passes)])


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
            turn = {"load_average_start": load_average()}
            if name == RAW:
                turn["raw"] = _raw_turn(args)
                print(f"   round {round_index} {name}: {turn['raw']['tokens_per_s']:.0f} tokens/s "
                      f"(best {turn['raw']['best_tokens_per_s']:.0f}), load {turn['load_average_start'][0]:.2f}",
                      flush=True)
            else:
                port = free_port()
                server = Server(server_command(name, args.model, port, args.openvino_python, args.queue), port)
                try:
                    server.wait_healthy()
                    asyncio.run(async_load(server.url, work[:8], 1, serve_harness.LEVEL_SECONDS))  # warm up
                    for client in clients:
                        run = CLIENTS[client](server.url, work)
                        turn[client] = summarize([run], bodies, refs, tokens)
                        print(f"   round {round_index} {name} {client}: {json.dumps(turn[client])} "
                              f"load {load_average()[0]:.2f}", flush=True)
                    if name.startswith("fastbert") and args.probe:
                        turn["probe_1x16"] = _probe_turn(server.url, args)
                        print(f"   round {round_index} {name} probe: {json.dumps(turn['probe_1x16'])}", flush=True)
                finally:
                    server.stop()
            turn["load_average_end"] = load_average()
            this_round[name] = turn
        rounds.append(this_round)
        record["rounds"] = rounds
        write_record(args.json, record)  # what was measured so far survives a stop
    record["summary"] = alone_summary(rounds)
    record["load_average_after"] = load_average()
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
            "load_average_before": load_average(),
            "machine": machine()}


