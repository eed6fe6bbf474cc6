"""The server's settings, checked once at startup with errors that name the argument and the value."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("fp32", "bf16", "int8", "auto")  # auto: fastbert.serve.precision.choose_dtype


class ServeConfigError(ValueError):
    """A setting or a model directory the server cannot run with (reported in one line by the CLI)."""


@dataclass(frozen=True)
class ServeOptions:
    model_dir: str
    dtype: str = "auto"
    max_batch_tokens: int = 16384
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    max_input_length: int | None = None  # None: the model's limit (sentence-transformers' max_seq_length first)
    api_key: str | None = None
    pooling: str | None = None  # None: 1_Pooling/config.json; required for embeddings without it
    batching: bool = True  # False: one forward per request (the baseline of benchmarks/serve_load.py)
    auto_truncate: bool = True  # truncate when a request does not say (TEI's default since 1.9)
    payload_limit: int = 2_000_000  # bytes of request body
    tokenization_workers: int = 1
    threads: int | None = None  # torch intra-op threads of the inference thread; None: torch's choice
    calibration: str | None = None  # --dtype int8: a text file, one calibration sentence per line
    model_id: str | None = None  # the model as named to --model-id (a directory or a Hub id); /info's model_id
    served_model_name: str | None = None  # the name /v1/embeddings answers with (default: model_id)
    default_prompt: str | None = None  # text put before every input that names no prompt
    default_prompt_name: str | None = None  # a key of config_sentence_transformers.json's "prompts"
    cors_allow_origin: tuple[str, ...] | None = None  # origins a browser may call from
    keep_freed_memory: bool = True  # fastbert.keep_freed_memory() in each server process (glibc only)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ServeConfigError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        for name in ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size", "payload_limit",
                     "tokenization_workers"):
            _require_positive(name, getattr(self, name))
        for name in ("max_input_length", "threads"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if self.calibration is not None and self.dtype != "int8":
            raise ServeConfigError(f"--calibration is only read with --dtype int8 (got --dtype {self.dtype})")
        if self.pooling is not None:
            object.__setattr__(self, "pooling", _pooling_mode(self.pooling))  # TEI's spelling -> ours
        if self.default_prompt is not None and self.default_prompt_name is not None:
            raise ServeConfigError("--default-prompt and --default-prompt-name exclude each other: give one")

    @property
    def name(self) -> str:
        """/info's model_id: the model as named on the command line, else the directory's name."""
        return self.model_id or Path(self.model_dir).name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeOptions":
        return cls(**json.loads(text))


def _pooling_mode(name: str) -> str:
    from fastbert.serve.pooling import mode_from_name  # torch: only when a pooling is given

    try:
        return mode_from_name(name)
    except ValueError as exc:
        raise ServeConfigError(f"--pooling {name!r}: {exc}") from None


def _require_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ServeConfigError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")
