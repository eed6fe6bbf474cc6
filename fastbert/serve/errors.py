"""Errors answered as JSON in TEI's shape: {"error": message, "error_type": kind, "request_id": id}."""
from __future__ import annotations

from fastapi.responses import JSONResponse


class ServeError(Exception):
    status = 500
    error_type = "Backend"

    def __init__(self, message: str, headers: dict | None = None, field: str | None = None):
        super().__init__(message)
        self.headers = headers or {}
        self.field = field


class ValidationFailed(ServeError):
    status, error_type = 422, "Validation"


class PayloadTooLarge(ServeError):
    status, error_type = 413, "Validation"


class WrongModel(ServeError):
    status, error_type = 400, "Validation"


class Unauthorized(ServeError):
    status, error_type = 401, "Unauthorized"


class OverloadedError(ServeError):
    status, error_type = 429, "Overloaded"


class BackendError(ServeError):
    status, error_type = 500, "Backend"


class Unhealthy(ServeError):
    status, error_type = 503, "Unhealthy"


def error_response(error: ServeError, request_id: str | None) -> JSONResponse:
    body = {"error": str(error), "error_type": error.error_type, "request_id": request_id}
    if error.field is not None:
        body["field"] = error.field
    headers = dict(error.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(body, status_code=error.status, headers=headers)
