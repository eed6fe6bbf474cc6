"""`fastbert serve`: text-embeddings-inference's command line (text-embeddings-router's flags and environment
variables, with TEI's meanings) plus fastbert's own options. The server is in fastbert.serve.app, imported only
when the command runs, so `fastbert --help` works without the serve extra."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from datetime import datetime, timezone

from fastbert.env import parse_flag
from fastbert.serve.options import DTYPES, ServeConfigError, ServeOptions

MISSING_EXTRA = "fastbert serve needs the serve extra: pip install 'fastbert[serve]' ({error})"
# TEI's --dtype spellings. The CPU path has no float16 kernels: float16 gets bf16, the 16-bit type it runs fast.
TEI_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}
# TEI options with nothing to act on here: accepted, so that TEI command lines run, and named in one warning.
IGNORED = {
    "max_batch_requests": "batches are bounded by --max-batch-tokens",
    "prometheus_port": "metrics are at /metrics on --port",
    "otlp_endpoint": "no OpenTelemetry export",
    "otlp_service_name": "no OpenTelemetry export",
    "disable_spans": "no tracing spans",
    "uds_path": "no gRPC backend",
}


# Between batches an OpenMP pool that keeps spinning takes the cores that tokenization, the event loop and
# same-machine clients need; HF tokenizers' own Rust pool would add threads beside the one tokenizer thread.
# libgomp reads its variables once, when torch loads it.
THREAD_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "TOKENIZERS_PARALLELISM": "false"}
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")


def _boolean(text: str) -> bool:
    """fastbert's one rule for booleans (fastbert.env), as an argparse type."""
    try:
        return parse_flag("the value", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # as the variable would spell it


def _origins(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


class _Environment:
    """Adds options that TEI also reads from the environment (--max-batch-tokens: $MAX_BATCH_TOKENS).

    Their argparse default is SUPPRESS, so that after parsing an absent attribute means "not on the command
    line": apply() then takes the first set variable, else the default (the command line beats the variable,
    which beats the default)."""

    def __init__(self):
        self.actions = []

    def add(self, group, *flags, default=None, env: tuple[str, ...] = (), from_text=None, **kwargs):
        action = group.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
        action.variables = env or (action.dest.upper(),)
        action.fallback, action.from_text = default, from_text or action.type or str
        shown = "" if default is None or default is False else f" (default: {_text(default)})"
        action.help = f"{action.help}{shown} [env: {', '.join(action.variables)}]"
        self.actions.append(action)

    def apply(self, args: argparse.Namespace) -> argparse.Namespace:
        for action in self.actions:
            if not hasattr(args, action.dest):
                name = next((name for name in action.variables if os.environ.get(name)), None)
                setattr(args, action.dest, action.fallback if name is None else _from_variable(action, name))
        return args


def _from_variable(action, name: str):
    text = os.environ[name]
    where = f"${name}={text!r} (for --{action.dest.replace('_', '-')})"
    try:
        value = action.from_text(text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ServeConfigError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise ServeConfigError(f"{where}: expected one of {', '.join(action.choices)}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = _Environment()
    _model_arguments(parser.add_argument_group("model (TEI's flags)"), env)
    _limit_arguments(parser.add_argument_group("batching and limits"), env)
    _network_arguments(parser.add_argument_group("network and logging"), env)
    ignored = parser.add_argument_group("TEI options accepted and ignored (one warning names them)")
    for dest, why in IGNORED.items():
        flag = "--" + dest.replace("_", "-")
        if dest == "disable_spans":
            env.add(ignored, flag, action="store_true", default=False, from_text=_boolean, help=why)
        else:
            env.add(ignored, flag, metavar="VALUE", help=why)
    parser.set_defaults(environment=env)


def _model_arguments(group, env: _Environment) -> None:
    group.add_argument("model_dir", metavar="MODEL_DIR", nargs="?",
                       help="the model to load, as --model-id (fastbert's older spelling; give one of the two)")
    group.add_argument("--model-id", help="the model to load: a local directory saved by transformers or "
                       "sentence-transformers (a *ForSequenceClassification serves /predict and /rerank), or a "
                       "Hub id (downloaded once online; from the Hub cache offline) [env: MODEL_ID]")
    env.add(group, "--revision", help="the Hub revision (branch, tag or commit) of a Hub --model-id; a local "
            "directory has none")
    env.add(group, "--served-model-name", help="the model name that /info and /v1/embeddings report "
            "(default: --model-id as given)")
    env.add(group, "--dtype", default="auto", choices=(*DTYPES, *TEI_DTYPES),
            help="auto: bf16 where the CPU has native bf16 (AMX or AVX512-BF16) and the model's outputs keep a "
                 "cosine >= 0.9999 to fp32 on built-in texts, else fp32; fp32 (= TEI's float32), bf16 "
                 "(= bfloat16), int8 (fastbert.quantize; needs --calibration); float16 serves bf16, with a warning")
    group.add_argument("--calibration", metavar="FILE", help="--dtype int8: your own texts, one a line")
    env.add(group, "--pooling", metavar="MODE", help="embedding pooling over 1_Pooling/config.json: cls, mean, "
            "last-token (TEI's names), max, mean_sqrt_len, weightedmean, lasttoken (required without that file)")
    env.add(group, "--default-prompt", help="text put before every input whose request names no prompt")
    env.add(group, "--default-prompt-name", help="the prompt (a key of config_sentence_transformers.json's "
            "prompts) put before every input whose request names no prompt")
    env.add(group, "--dense-path", help="refused: a sentence-transformers Dense module is not served")
    env.add(group, "--hf-token", "--hf-api-token", env=("HF_TOKEN", "HF_API_TOKEN"),
            help="Hub token for a gated or private Hub --model-id (--hf-api-token: TEI's deprecated spelling)")
    env.add(group, "--huggingface-hub-cache", metavar="DIR", help="the Hub cache a Hub --model-id is read from "
            "and downloaded to")


def _limit_arguments(group, env: _Environment) -> None:
    env.add(group, "--max-batch-tokens", type=int, default=16384, help="real tokens per forward")
    env.add(group, "--max-concurrent-requests", type=int, default=512,
            help="requests in flight before answering 429")
    env.add(group, "--max-client-batch-size", type=int, default=32, help="inputs per request")
    group.add_argument("--max-input-length", type=int, help="tokens per input (default: the model's limit)")
    env.add(group, "--auto-truncate", nargs="?", const=True, type=_boolean, default=True, metavar="true|false",
            help="cut inputs over the length limit when the request does not say (`truncate`); false: answer 413")
    env.add(group, "--payload-limit", type=int, default=2_000_000, help="request body bytes")
    env.add(group, "--tokenization-workers", type=int, default=1, help="tokenizer threads per server process")
    group.add_argument("--no-batching", action="store_true", help="one forward per request (for comparisons)")
    group.add_argument("--workers", type=int, default=1, help="server processes, each pinned to its own cores")
    group.add_argument("--threads", type=int, help="torch threads per worker (default: torch's, or the worker's "
                       "cores with --workers)")
    env.add(group, "--keep-freed-memory", nargs="?", const=True, type=_boolean, default=True, metavar="true|false",
            env=("FASTBERT_KEEP_FREED_MEMORY",),
            help="glibc keeps the memory a forward frees, so large batches do not fault their activations in "
                 "again every forward (the process holds its peak; fastbert.keep_freed_memory())")
    group.add_argument("--no-thread-env", action="store_true", help="leave OMP_WAIT_POLICY, KMP_BLOCKTIME and "
                       "TOKENIZERS_PARALLELISM unset (default: PASSIVE, 0 and false where unset; for comparisons)")


def _network_arguments(group, env: _Environment) -> None:
    env.add(group, "--hostname", "--host", default="127.0.0.1",
            help="address to listen on (TEI's default is 0.0.0.0: every interface)")
    env.add(group, "-p", "--port", type=int, default=8080, help="port to listen on (TEI's default is 3000)")
    env.add(group, "--api-key", env=("API_KEY", "FASTBERT_API_KEY"),
            help="require Authorization: Bearer KEY on every endpoint but /health")
    env.add(group, "--cors-allow-origin", action="append", from_text=_origins, metavar="ORIGIN",
            help="an origin browsers may call from (repeat it; the variable takes a comma list)")
    env.add(group, "--json-output", action="store_true", default=False, from_text=_boolean,
            help="the server's log as JSON lines")
    group.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                       help="the server's log level")


def _warn(message: str) -> None:
    print(f"fastbert serve: warning: {message}", file=sys.stderr)


def _model_id(args) -> str:
    """The model to load: MODEL_DIR or --model-id (one of them), else $MODEL_ID."""
    if args.model_dir and args.model_id:
        raise ServeConfigError("MODEL_DIR and --model-id both name the model to load: give one (the name that "
                               "/info and /v1/embeddings report is --served-model-name)")
    model_id = args.model_dir or args.model_id or os.environ.get("MODEL_ID")
    if not model_id:
        raise ServeConfigError("no model: pass --model-id DIR_OR_HUB_ID (or set $MODEL_ID)")
    return model_id


def _dtype(name: str) -> str:
    if name == "float16":
        _warn("--dtype float16: the CPU path has no float16 kernels; serving bfloat16 (the same size)")
    return TEI_DTYPES.get(name, name)


def _check_tei_options(args) -> None:
    """Refuse the TEI options that would change the answers if ignored; name the others in one warning."""
    if args.dense_path is not None:
        raise ServeConfigError(f"--dense-path {args.dense_path}: a Dense module is not served (fastbert serve "
                               "runs sentence-transformers' Transformer, Pooling and Normalize modules only)")
    ignored = [f"--{dest.replace('_', '-')} ({why})" for dest, why in IGNORED.items()
               if getattr(args, dest) not in (None, False)]
    if ignored:
        _warn(f"ignoring TEI options with no counterpart here: {', '.join(ignored)}")


def options_from_args(args) -> ServeOptions:
    """The server's settings from the parsed command line and TEI's environment variables."""
    from fastbert.serve.loading import resolve_model_dir

    model_id = _model_id(args)
    args.environment.apply(args)
    _check_tei_options(args)
    return ServeOptions(
        model_dir=resolve_model_dir(model_id, args.revision, args.huggingface_hub_cache, args.hf_token),
        model_id=model_id, served_model_name=args.served_model_name, dtype=_dtype(args.dtype),
        max_batch_tokens=args.max_batch_tokens, max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size, max_input_length=args.max_input_length,
        api_key=args.api_key, pooling=args.pooling, batching=not args.no_batching, auto_truncate=args.auto_truncate,
        payload_limit=args.payload_limit, tokenization_workers=args.tokenization_workers, threads=args.threads,
        calibration=args.calibration, default_prompt=args.default_prompt,
        default_prompt_name=args.default_prompt_name,
        cors_allow_origin=tuple(args.cors_allow_origin) if args.cors_allow_origin else None,
        keep_freed_memory=args.keep_freed_memory,
    )


class JsonFormatter(logging.Formatter):
    """--json-output: one JSON object a line, in TEI's shape (timestamp, level, fields.message, target)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"message": record.getMessage()}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        timestamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds")
        return json.dumps({"timestamp": timestamp.replace("+00:00", "Z"), "level": record.levelname,
                           "fields": fields, "target": record.name})


def log_config(json_output: bool, level: str) -> dict:
    """uvicorn's logging config, with fastbert's loggers on its handler, and JSON lines for --json-output."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["fastbert"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    if json_output:
        config["formatters"] = {name: {"()": f"{__name__}.JsonFormatter"} for name in config["formatters"]}
    return config


def set_thread_environment(args) -> dict[str, str]:
    """THREAD_ENVIRONMENT's variables that the user left unset, now set in os.environ (so --workers' processes
    inherit them); printed. Restarts the `fastbert` command when torch has loaded OpenMP before they were set."""
    added = {} if args.no_thread_env else {k: v for k, v in THREAD_ENVIRONMENT.items() if k not in os.environ}
    if not added:
        return added
    os.environ.update(added)
    print("fastbert serve: threads: " + " ".join(f"{k}={v}" for k, v in added.items()) + " (idle OpenMP threads "
          "sleep; tokenization stays on its own threads)", file=sys.stderr, flush=True)
    if "torch" in sys.modules and set(added) & set(OPENMP_VARIABLES) and _is_serve_command():
        os.execv(sys.executable, sys.orig_argv)  # too late for this process's OpenMP: start again with them set
    return added


def _is_serve_command() -> bool:
    """This process is `fastbert serve` or `python -m fastbert serve` (not a test or a library calling main)."""
    return sys.argv[1:2] == ["serve"] and os.path.basename(sys.argv[0]) in ("fastbert", "__main__.py")


def main(args) -> int:
    try:
        options = options_from_args(args)
        if args.workers < 1:
            raise ServeConfigError(f"--workers {args.workers!r}: expected a positive integer")
        set_thread_environment(args)
        import uvicorn

        from fastbert.serve.app import create_app, default_engine
        engine = default_engine(options) if args.workers == 1 else None  # load errors: one line, exit 1
    except ImportError as exc:
        print(MISSING_EXTRA.format(error=exc), file=sys.stderr)
        return 1
    except ServeConfigError as exc:
        print(f"fastbert serve: error: {exc}", file=sys.stderr)
        return 1
    config = dict(host=args.hostname, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None,
                  log_config=log_config(args.json_output, args.log_level))
    if args.workers == 1:
        uvicorn.run(create_app(options, engine_factory=lambda _: engine), **config)
        return 0
    os.environ["FASTBERT_SERVE_OPTIONS"] = options.to_json()
    os.environ["FASTBERT_SERVE_WORKERS"] = str(args.workers)
    uvicorn.run("fastbert.serve.app:app_from_environment", factory=True, workers=args.workers, **config)
    return 0
