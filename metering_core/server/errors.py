"""One error shape for every answer: `{"error": {"type", "message", "field"?}}`."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from metering_core.errors import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    MeteringError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    QueueFullError,
    RateLimitedError,
    UnsupportedOperationError,
    ValidationError,
)
from metering_core.models import describe_error

ERROR_TYPES: dict[type[MeteringError], tuple[str, int]] = {
    ValidationError: ("validation_error", 422),
    UnsupportedOperationError: ("unsupported_operation", 400),
    NotFoundError: ("not_found", 404),
    ConflictError: ("conflict", 409),
    RateLimitedError: ("rate_limited", 429),
    QueueFullError: ("queue_full", 503),
    ProviderUnavailableError: ("provider_unavailable", 503),
    AuthenticationError: ("provider_authentication", 502),
    ProviderError: ("provider_error", 502),
    ConfigurationError: ("configuration_error", 500),
    MeteringError: ("metering_error", 500),
}
"""Error type names and statuses, most specific first; the HTTP provider maps them back."""


class Forbidden(Exception):
    """The caller's key is missing or unknown (401), or may not do this (403)."""

    def __init__(self, message: str, status_code: int = 403) -> None:
        super().__init__(message)
        self.status_code = status_code


def _error(
    kind: str, message: str, status_code: int, field: str | None = None, **headers: str
) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status_code, headers=headers or None)


def _metering_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MeteringError)
    kind, status_code = next(v for t, v in ERROR_TYPES.items() if isinstance(exc, t))
    headers = {}
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    field = exc.field if isinstance(exc, ValidationError) else None
    return _error(kind, str(exc), status_code, field, **headers)


def _request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    texts = [describe_error(error)[1] for error in errors]
    return _error(
        "validation_error", "invalid request: " + "; ".join(texts), 422, ".".join(location) or None
    )


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Unknown routes and methods (404, 405) answer in the one error shape too."""
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "http_error"
    return _error(kind, str(exc.detail), exc.status_code, **(exc.headers or {}))


def _forbidden(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Forbidden)
    kind = "unauthorized" if exc.status_code == 401 else "forbidden"
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {}
    return _error(kind, str(exc), exc.status_code, **headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MeteringError, _metering_error)
    app.add_exception_handler(RequestValidationError, _request_error)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(HTTPException, _http_error)
