"""ASGI middleware in front of every route: request id, API key, body size limit, request counts, and
a 500 with the request id for any exception a route lets through."""
from __future__ import annotations

import hmac
import logging
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from fastbert.serve.errors import BackendError, PayloadTooLarge, Unauthorized, error_response

logger = logging.getLogger("fastbert.serve")
OPEN_PATHS = frozenset({"/health"})  # load balancers probe without a key
ENDPOINTS = frozenset({"/embed", "/rerank", "/predict", "/tokenize", "/v1/embeddings", "/health", "/info",
                       "/metrics"})


def _request_id(headers: Headers) -> str:
    given = headers.get("x-request-id", "")
    return given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex


class Gatekeeper:
    def __init__(self, app, api_key: str | None, payload_limit: int, metrics):
        self.app, self.api_key, self.payload_limit, self.metrics = app, api_key, payload_limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        request_id = _request_id(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).setdefault("x-request-id", request_id)
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await error_response(refusal, request_id)(scope, receive, send_with_id)
        try:
            await self.app(scope, self._limited(receive), send_with_id)
        except Exception as exc:  # noqa: BLE001 - answer 500 with the id, log the traceback, keep serving
            logger.exception("request %s failed", request_id)
            if not started:
                error = BackendError(f"internal error: {type(exc).__name__}")
                await error_response(error, request_id)(scope, receive, send_with_id)

    def _refusal(self, path: str, headers: Headers):
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)",
                                    headers={"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.payload_limit:
            return PayloadTooLarge(f"request body of {length} bytes is over the limit of {self.payload_limit} bytes")
        return None

    def _limited(self, receive):
        """receive() that stops a chunked body (no Content-Length) at the payload limit."""
        total = 0

        async def limited():
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.payload_limit:
                raise HTTPException(413, f"request body is over the limit of {self.payload_limit} bytes")
            return message

        return limited
