"""One error shape for every answer: `{"error": {"type", "message", "field"?}}`.

Types and statuses come from the core's one table (`metering_core.errors.ERROR_TYPES`),
which the HTTP provider maps back. Nothing leaves as a plain-text 500: an unexpected
failure is logged here and answered in the same shape.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from metering_core.errors import MeteringError, RateLimitedError, ValidationError, clip, wire_type
from metering_core.models import described_errors
from metering_core.server.body_limit import MAX_NOTICE_BYTES
from metering_core.server.key_first import WEBHOOKS

logger = logging.getLogger("metering.server")

RETRY_AFTER = 5
"""Seconds a caller is asked to wait after a failure behind the service (503)."""


class AfterActing(Exception):
    """A message of a batch failed after the messages before it acted. Answered as its
    error says, and saying so: a caller told only "409" would take the batch for undone."""

    def __init__(self, error: MeteringError, index: int, count: int) -> None:
        super().__init__(str(error))
        self.error, self.index, self.count = error, index, count

    def told(self) -> str:
        """What the caller is told before the error's own message."""
        before = "the message" if self.index == 1 else f"the {self.index} messages"
        return (
            f"message {self.index + 1} of {self.count} failed after {before} before it acted "
            "(sending the batch again repeats those harmlessly): "
        )


class Forbidden(HTTPException):
    """The caller's key is missing or unknown (401), or may not do this (403). An
    HTTPException, so that FastAPI lets it through when raised while a body is read."""

    def __init__(self, message: str, status_code: int = 403) -> None:
        super().__init__(status_code, message)


def _error(
    kind: str, message: str, status_code: int, field: str | None = None, **headers: str
) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": clip(message)}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status_code, headers=headers or None)


_BEHIND_THE_SERVICE = {
    "provider_unavailable": "the metering store is unavailable: retry later",
    "provider_authentication": "the service's credentials for its metering store were refused",
    "provider_error": "the metering store failed or refused the request",
    "configuration_error": "the metering service is misconfigured",
    "metering_error": "the metering service failed",
}
"""What a caller is told of a failure behind the service: the cause (a store's address and
user, a driver's message) is the operator's to read in the service's log, not a caller's."""


def _metering_error(request: Request, exc: Exception, told: str = "") -> JSONResponse:
    assert isinstance(exc, MeteringError)
    kind, status_code = wire_type(exc)
    headers = {}
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    elif status_code == 503:
        headers["Retry-After"] = str(RETRY_AFTER)
    field = exc.field if isinstance(exc, ValidationError) else None
    message = str(exc)
    if kind in _BEHIND_THE_SERVICE:
        logger.warning("%s %s: %s: %s", request.method, request.url.path, kind, message)
        request.app.state.service.health.failed(kind)
        message = f"{_BEHIND_THE_SERVICE[kind]} (the service logged the cause)"
    return _error(kind, told + message, status_code, field, **headers)


def _after_acting(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AfterActing)
    return _metering_error(request, exc.error, exc.told())


def _request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    if first.get("type") == "json_invalid":  # its location is a byte offset, not a field
        location = ["body"]
    message = "invalid request: " + described_errors(list(errors))
    return _error("validation_error", message, 422, ".".join(location) or None)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Unknown routes (404) and methods (405) answer in the one error shape too; a body
    that cannot be parsed (400) is a validation error of the body, like any other; so is
    one too large to read (413), which a client's pipeline then sends in halves."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:
        return _error("validation_error", f"invalid request body: {exc.detail}", 422, "body")
    if exc.status_code == 413:
        limit = request.app.state.max_body_bytes
        if request.url.path.startswith(WEBHOOKS):
            limit = min(limit, MAX_NOTICE_BYTES)
        message = f"the request body is over the service's limit of {limit} bytes: send less"
        return _error("validation_error", message, 413, "body")
    kind = "not_found" if exc.status_code == 404 else "http_error"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every method the path takes, not only one route's
        headers["Allow"] = ", ".join(_allowed(request))
    return _error(kind, str(exc.detail), exc.status_code, **headers)


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def _allowed(request: Request) -> list[str]:
    """Every method some route takes on the request's path (each route takes one)."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.routes
        )
    ]


def _forbidden(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Forbidden)
    kind = "unauthorized" if exc.status_code == 401 else "forbidden"
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {}
    return _error(kind, str(exc.detail), exc.status_code, **headers)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A failure nothing foresaw: logged with its traceback, answered without its text."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error("internal_error", "the service failed unexpectedly; it is logged", 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MeteringError, _metering_error)
    app.add_exception_handler(AfterActing, _after_acting)
    app.add_exception_handler(RequestValidationError, _request_error)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
