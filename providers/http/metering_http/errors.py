"""HTTP answers and transport failures, as the core's exceptions."""

from __future__ import annotations

import httpx

from metering_core.errors import (
    AuthenticationError,
    ConflictError,
    MeteringError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
    UnsupportedOperationError,
    ValidationError,
)

PROVIDER = "http"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def error_from_response(response: httpx.Response, operation: str) -> MeteringError:
    """The exception an error answer stands for, by the service's error type and status."""
    try:
        body = response.json()["error"]
        kind, message, field = body["type"], body["message"], body.get("field")
    except (ValueError, KeyError, TypeError):
        kind, message, field = "", f"HTTP {response.status_code}: {response.text[:200]}", None
    status = response.status_code
    if status == 429:
        return RateLimitedError(message, provider=PROVIDER, retry_after=_retry_after(response))
    if kind == "unsupported_operation":
        return UnsupportedOperationError(PROVIDER, operation, message)
    if status in (400, 422):
        return ValidationError(message, field=field)
    if status in (401, 403) or kind == "provider_authentication":
        return AuthenticationError(message, provider=PROVIDER, status_code=status)
    if status == 404:
        return NotFoundError(message)
    if status == 409:
        return ConflictError(message)
    if status >= 500 and kind != "provider_error":
        return ProviderUnavailableError(message, provider=PROVIDER, status_code=status)
    return ProviderError(message, provider=PROVIDER, status_code=status)


def error_from_transport(exc: httpx.TransportError) -> ProviderUnavailableError:
    return ProviderUnavailableError(
        f"metering service unreachable: {type(exc).__name__}: {exc}", provider=PROVIDER
    )
