"""`fastbert serve MODEL_DIR ...`: argument parsing here, the server in fastbert.serve.app (imported only
when the command runs, so `fastbert --help` works without the serve extra)."""
from __future__ import annotations

import argparse
import os
import sys

from fastbert.serve.options import DTYPES, ServeConfigError, ServeOptions

MISSING_EXTRA = "fastbert serve needs the serve extra: pip install 'fastbert[serve]' ({error})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a local HuggingFace model directory (a "
                        "sentence-transformers directory for embeddings, a *ForSequenceClassification for "
                        "/predict and /rerank)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="int8 needs fastbert.quantize")
    parser.add_argument("--calibration", metavar="FILE", help="--dtype int8: calibration text, one line each")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="real tokens per forward")
    parser.add_argument("--max-concurrent-requests", type=int, default=512,
                        help="requests in flight before answering 429")
    parser.add_argument("--max-client-batch-size", type=int, default=32, help="inputs per request")
    parser.add_argument("--max-input-length", type=int, help="tokens per input (default: the model's limit)")
    parser.add_argument("--api-key", default=os.environ.get("FASTBERT_API_KEY"),
                        help="require Authorization: Bearer KEY (default: $FASTBERT_API_KEY)")
    parser.add_argument("--workers", type=int, default=1, help="server processes, each pinned to its own cores")
    parser.add_argument("--pooling", help="embedding pooling when the directory has no 1_Pooling/config.json")
    parser.add_argument("--auto-truncate", action="store_true", help="truncate long inputs unless told not to")
    parser.add_argument("--no-batching", action="store_true", help="one forward per request (for comparisons)")
    parser.add_argument("--payload-limit", type=int, default=2_000_000, help="request body bytes")
    parser.add_argument("--tokenization-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's, or the "
                        "worker's cores with --workers)")
    parser.add_argument("--model-id", help="name reported by /info and /v1/embeddings")
    parser.add_argument("--log-level", default="info")


def options_from_args(args) -> ServeOptions:
    return ServeOptions(
        model_dir=args.model_dir, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens,
        max_concurrent_requests=args.max_concurrent_requests, max_client_batch_size=args.max_client_batch_size,
        max_input_length=args.max_input_length, api_key=args.api_key, pooling=args.pooling,
        batching=not args.no_batching, auto_truncate=args.auto_truncate, payload_limit=args.payload_limit,
        tokenization_workers=args.tokenization_workers, threads=args.threads, calibration=args.calibration,
        model_id=args.model_id,
    )


def main(args) -> int:
    try:
        options = options_from_args(args)
        if args.workers < 1:
            raise ServeConfigError(f"--workers {args.workers!r}: expected a positive integer")
        import uvicorn

        from fastbert.serve.app import create_app, default_engine
        engine = default_engine(options) if args.workers == 1 else None  # load errors: one line, exit 1
    except ImportError as exc:
        print(MISSING_EXTRA.format(error=exc), file=sys.stderr)
        return 1
    except ServeConfigError as exc:
        print(f"fastbert serve: error: {exc}", file=sys.stderr)
        return 1
    config = dict(host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
    if args.workers == 1:
        uvicorn.run(create_app(options, engine_factory=lambda _: engine), **config)
        return 0
    os.environ["FASTBERT_SERVE_OPTIONS"] = options.to_json()
    os.environ["FASTBERT_SERVE_WORKERS"] = str(args.workers)
    uvicorn.run("fastbert.serve.app:app_from_environment", factory=True, workers=args.workers, **config)
    return 0
