"""The FastAPI app: TEI's endpoints on the batcher.

Each request: admission (429 when --max-concurrent-requests are in flight), tokenization in a thread pool
(413 over the length limit unless truncating), then its sequences go to the batcher and the handler
awaits their rows in order.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from fastbert.cpu import allocator
from fastbert.serve import errors
from fastbert.serve.batcher import AdmissionLimit, Batcher, BatchFailed, Overloaded
from fastbert.serve.engine import Engine, InputTooLong, settle_dtype
from fastbert.serve.gatekeeper import Gatekeeper
from fastbert.serve.metrics import CONTENT_TYPE, ServeMetrics
from fastbert.serve.options import ServeOptions
from fastbert.serve.schemas import (
    EmbedRequest,
    FieldError,
    OpenAIEmbeddingsRequest,
    PredictRequest,
    RerankRequest,
    TokenizeRequest,
    predict_inputs,
    text_list,
)

logger = logging.getLogger("fastbert.serve")
RETRY_AFTER_SECONDS = "1"


class FastJSON(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def default_engine(options: ServeOptions) -> Engine:
    from fastbert.serve.loading import load_model

    if options.keep_freed_memory:  # here, so that every --workers process does it
        allocator.keep_if_possible("--keep-freed-memory")
        print(f"fastbert serve: allocator: {allocator.state()}", file=sys.stderr, flush=True)
    return Engine(settle_dtype(load_model(options), options.dtype))


class Serving:
    """Everything one app instance holds: the engine, the batcher, the admission count, the metrics."""

    def __init__(self, options: ServeOptions, engine_factory=default_engine):
        self.options = options
        self.engine_factory = engine_factory
        self.metrics = ServeMetrics()
        self.limit = AdmissionLimit(options.max_concurrent_requests)
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.ready = False

    @property
    def model_id(self) -> str:
        return self.options.name

    @property
    def served_model_name(self) -> str:
        return self.options.served_model_name or self.model_id

    async def start(self) -> None:
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        self.engine = await asyncio.to_thread(self.engine_factory, self.options)
        self.pool = ThreadPoolExecutor(self.options.tokenization_workers, thread_name_prefix="fastbert-tokenize")
        self.batcher = Batcher(self._forward, self.options.max_batch_tokens, self.options.batching, self.metrics)
        self.batcher.start()
        warm_up = ["warm up"] if self.engine.loaded.kind == "embedding" else [("warm", "up")]
        await self.run(warm_up, truncate=True)  # /health answers 200 only after this forward
        self.ready = True

    async def stop(self) -> None:
        """After uvicorn drained the connections: finish anything queued, then end the threads."""
        self.ready = False
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _forward(self, sequences):
        return self.engine.forward(sequences)

    def check_batch_size(self, field: str, count: int) -> None:
        if count > self.options.max_client_batch_size:
            raise errors.PayloadTooLarge(f"`{field}` has {count} inputs; the limit is "
                                         f"{self.options.max_client_batch_size} (--max-client-batch-size)",
                                         field=field)

    def prompted(self, texts: list[str], prompt_name: str | None) -> list[str]:
        """The texts with the request's prompt (or the server's default prompt) put before each, as TEI does."""
        try:
            prompt = self.engine.loaded.prompt(prompt_name)
        except ValueError as exc:
            raise FieldError("prompt_name", str(exc)) from None
        return [prompt + text for text in texts] if prompt else texts

    def truncation(self, request) -> tuple[bool, str]:
        truncate = self.options.auto_truncate if request.truncate is None else request.truncate
        return truncate, request.truncation_direction.lower()

    async def in_pool(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def run(self, texts: list, truncate: bool, direction: str = "right"):
        """(encoded sequences, one output row per text) under the admission limit."""
        with self.limit:
            self.metrics.in_flight.set(self.limit.in_flight)
            try:
                started = time.perf_counter()
                encoded = await self.in_pool(self.engine.tokenize, texts, truncate, direction)
                self.metrics.tokenize_seconds.observe(time.perf_counter() - started)
                return encoded, await self.batcher.submit(encoded)
            finally:
                self.metrics.in_flight.set(self.limit.in_flight - 1)

    def require(self, kind: str, endpoint: str) -> None:
        if not self.ready:
            raise errors.Unhealthy("the model is not loaded")
        if self.engine.loaded.kind != kind:
            raise errors.WrongModel(f"{endpoint} needs a {kind} model; {self.model_id} is "
                                    f"{self.engine.loaded.kind}")


# ---- output shaping -------------------------------------------------------------------------------


def embeddings(rows: list, normalize: bool, dimensions: int | None) -> np.ndarray:
    values = torch.stack(rows)
    if dimensions is not None:
        if dimensions > values.shape[1]:
            raise FieldError("dimensions", f"{dimensions} is over the model's {values.shape[1]} dimensions")
        values = values[:, :dimensions]
    if normalize:
        values = F.normalize(values, p=2, dim=1)
    return values.numpy()


def scores(serving: Serving, logits: torch.Tensor, raw: bool) -> torch.Tensor:
    loaded = serving.engine.loaded
    if raw:
        return logits
    if logits.shape[-1] == 1 or loaded.problem_type == "multi_label_classification":
        return logits.sigmoid()
    return logits.softmax(-1)


def labelled(serving: Serving, row: torch.Tensor) -> list[dict]:
    id2label = serving.engine.loaded.id2label
    ranked = sorted(enumerate(row.tolist()), key=lambda pair: -pair[1])
    return [{"score": score, "label": id2label.get(index, f"LABEL_{index}")} for index, score in ranked]


def info(serving: Serving) -> dict:
    loaded, options = serving.engine.loaded, serving.options
    choice = loaded.dtype_choice
    if loaded.kind == "embedding":
        model_type = {"embedding": {"pooling": "+".join(loaded.pooling)}}
    else:
        labels = {str(k): v for k, v in loaded.id2label.items()}
        kind = "reranker" if len(labels) == 1 else "classifier"
        model_type = {kind: {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}}
    return {
        "model_id": serving.model_id, "served_model_name": serving.served_model_name, "model_sha": None,
        "model_dtype": {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}[choice.dtype],
        "dtype_choice": choice.dtype, "dtype_reason": choice.reason, "bf16_cosine": choice.bf16_cosine,
        "model_type": model_type, "max_concurrent_requests": options.max_concurrent_requests,
        "max_input_length": loaded.max_input_length, "max_batch_tokens": options.max_batch_tokens,
        "max_batch_requests": None, "max_client_batch_size": options.max_client_batch_size,
        "auto_truncate": options.auto_truncate, "tokenization_workers": options.tokenization_workers,
        "batching": options.batching, "allocator": allocator.state(),
        "version": _version(), "sha": None, "docker_label": None,
    }


def _version() -> str:
    import fastbert

    return fastbert.__version__


# ---- routes ---------------------------------------------------------------------------------------


def add_routes(app: FastAPI, serving: Serving) -> None:
    @app.post("/embed", response_class=FastJSON)
    async def embed(body: EmbedRequest):
        serving.require("embedding", "/embed")
        texts = text_list("inputs", body.inputs)
        serving.check_batch_size("inputs", len(texts))
        _, rows = await serving.run(serving.prompted(texts, body.prompt_name), *serving.truncation(body))
        return FastJSON(embeddings(rows, body.normalize, body.dimensions))

    @app.post("/v1/embeddings", response_class=FastJSON)
    async def openai_embeddings(body: OpenAIEmbeddingsRequest):
        serving.require("embedding", "/v1/embeddings")
        if not isinstance(body.input, str) and body.input and not isinstance(body.input[0], str):
            raise FieldError("input", "token arrays are not supported; send text")
        texts = text_list("input", body.input)
        serving.check_batch_size("input", len(texts))
        encoded, rows = await serving.run(serving.prompted(texts, None), serving.options.auto_truncate)
        values = embeddings(rows, True, body.dimensions)  # TEI: OpenAI's embeddings are unit vectors
        if body.encoding_format == "base64":
            data = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in values]
        else:
            data = list(values)
        tokens = sum(len(item) for item in encoded)
        return FastJSON({"object": "list", "model": serving.served_model_name,
                         "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(data)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/rerank", response_class=FastJSON)
    async def rerank(body: RerankRequest):
        serving.require("classifier", "/rerank")
        labels = len(serving.engine.loaded.id2label)
        if labels != 1:
            raise errors.WrongModel(f"/rerank needs a classifier with one label (a cross-encoder); this one has "
                                    f"{labels}")
        texts = text_list("texts", body.texts)
        if not body.query:
            raise FieldError("query", "must not be an empty string")
        serving.check_batch_size("texts", len(texts))
        _, rows = await serving.run([(body.query, text) for text in texts], *serving.truncation(body))
        values = scores(serving, torch.stack(rows), body.raw_scores)[:, 0].tolist()
        ranked = sorted(range(len(texts)), key=lambda index: -values[index])
        return FastJSON([{"index": i, "score": values[i], **({"text": texts[i]} if body.return_text else {})}
                         for i in ranked])

    @app.post("/predict", response_class=FastJSON)
    async def predict(body: PredictRequest):
        serving.require("classifier", "/predict")
        inputs, batched = predict_inputs(body.inputs)
        serving.check_batch_size("inputs", len(inputs))
        _, rows = await serving.run(inputs, *serving.truncation(body))
        results = [labelled(serving, row) for row in scores(serving, torch.stack(rows), body.raw_scores)]
        return FastJSON(results if batched else results[0])

    @app.post("/tokenize", response_class=FastJSON)
    async def tokenize(body: TokenizeRequest):
        if not serving.ready:
            raise errors.Unhealthy("the model is not loaded")
        texts = text_list("inputs", body.inputs)
        serving.check_batch_size("inputs", len(texts))
        texts = serving.prompted(texts, body.prompt_name)
        with serving.limit:
            return FastJSON(await serving.in_pool(serving.engine.tokens, texts, body.add_special_tokens))

    @app.get("/health")
    async def health():
        if not (serving.ready and serving.batcher.alive):
            raise errors.Unhealthy("not ready")
        return Response(status_code=200)

    @app.get("/info", response_class=FastJSON)
    async def get_info():
        if serving.engine is None:
            raise errors.Unhealthy("the model is not loaded")
        return FastJSON(info(serving))

    @app.get("/metrics")
    async def metrics():
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)


# ---- errors ---------------------------------------------------------------------------------------


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _validation_field(error: dict) -> str:
    if error.get("type") == "json_invalid":  # its location is a character offset
        return "body"
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    return location[0] if location else "body"


def _message(error: dict) -> str:
    if error.get("type") == "json_invalid":
        return f"invalid JSON at character {error['loc'][-1]}: {error.get('ctx', {}).get('error', '')}"
    return error.get("msg", "")


TRANSLATIONS = {
    Overloaded: lambda exc: errors.OverloadedError(f"overloaded: {exc}; retry later",
                                                   headers={"retry-after": RETRY_AFTER_SECONDS}),
    InputTooLong: lambda exc: errors.PayloadTooLarge(str(exc), field="inputs"),
    FieldError: lambda exc: errors.ValidationFailed(str(exc), field=exc.field),
    BatchFailed: lambda exc: errors.BackendError(str(exc)),
}


def add_error_handlers(app: FastAPI) -> None:
    async def serve_error(request: Request, exc: errors.ServeError):
        return errors.error_response(exc, _request_id(request))

    async def translated(request: Request, exc: Exception):
        return errors.error_response(TRANSLATIONS[type(exc)](exc), _request_id(request))

    async def invalid_request(request: Request, exc: RequestValidationError):
        details = exc.errors()
        field = _validation_field(details[0]) if details else "body"
        messages = "; ".join(sorted({_message(d) for d in details if _validation_field(d) == field}))
        error = errors.ValidationFailed(f"`{field}`: {messages}", field=field)
        return errors.error_response(error, _request_id(request))

    async def http_error(request: Request, exc: HTTPException):
        error = errors.ServeError(str(exc.detail), headers=dict(exc.headers or {}))
        error.status, error.error_type = exc.status_code, "Validation" if exc.status_code < 500 else "Backend"
        return errors.error_response(error, _request_id(request))

    app.add_exception_handler(errors.ServeError, serve_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    for exc_class in TRANSLATIONS:
        app.add_exception_handler(exc_class, translated)


def create_app(options: ServeOptions, engine_factory=default_engine) -> FastAPI:
    """The app; the model loads and a warm-up forward runs at lifespan startup."""
    serving = Serving(options, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await serving.start()
        logger.info("fastbert serve: %s ready (%s, batching %s)", serving.model_id,
                    serving.engine.loaded.dtype_choice.describe(), "on" if options.batching else "off")
        try:
            yield
        finally:
            await serving.stop()

    app = FastAPI(title="fastbert serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = serving
    add_routes(app, serving)
    add_error_handlers(app)
    app.add_middleware(Gatekeeper, api_key=options.api_key, payload_limit=options.payload_limit,
                       metrics=serving.metrics)
    if options.cors_allow_origin:  # outermost, so that a browser's preflight needs no API key (TEI's order)
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_allow_origin),
                           allow_methods=["GET", "POST"], allow_headers=["content-type", "authorization"])
    return app


def app_from_environment() -> FastAPI:
    """uvicorn's factory for --workers N: options from FASTBERT_SERVE_OPTIONS, each worker pinned to its cores."""
    from fastbert.serve.workers import pin_this_worker

    options = ServeOptions.from_json(os.environ["FASTBERT_SERVE_OPTIONS"])
    threads = pin_this_worker(int(os.environ.get("FASTBERT_SERVE_WORKERS", "1")), os.environ.get(
        "FASTBERT_SERVE_SLOT_DIR", "/tmp"))
    if threads and options.threads is None:
        options = dataclasses.replace(options, threads=threads)
    return create_app(options)
