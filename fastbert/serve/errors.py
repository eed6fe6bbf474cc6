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


def _kind(name: str, status: int, error_type: str) -> type:
    return type(name, (ServeError,), {"status": status, "error_type": error_type, "__module__": __name__})


ValidationFailed = _kind("ValidationFailed", 422, "Validation")
PayloadTooLarge = _kind("PayloadTooLarge", 413, "Validation")
WrongModel = _kind("WrongModel", 400, "Validation")
Unauthorized = _kind("Unauthorized", 401, "Unauthorized")
OverloadedError = _kind("OverloadedError", 429, "Overloaded")
BackendError = _kind("BackendError", 500, "Backend")
Unhealthy = _kind("Unhealthy", 503, "Unhealthy")


def error_response(error: ServeError, request_id: str | None) -> JSONResponse:
    body = {"error": str(error), "error_type": error.error_type, "request_id": request_id}
    if error.field is not None:
        body["field"] = error.field
    headers = dict(error.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(body, status_code=error.status, headers=headers)
