"""The exception hierarchy: every failure a caller can catch, from one root, and the one
table that names each on the wire (the REST service answers with it, the HTTP provider
maps it back)."""

from __future__ import annotations

from typing import Any


class MeteringError(Exception):
    """Root of every error this library raises."""


class ConfigurationError(MeteringError):
    """Settings are missing or wrong; nothing was sent anywhere."""


class ProviderNotFoundError(ConfigurationError):
    """The configured provider name is not installed."""

    def __init__(self, name: str, installed: list[str]) -> None:
        self.name = name
        self.installed = sorted(installed)
        listing = ", ".join(self.installed) or "none"
        super().__init__(
            f"provider {name!r} is not installed (installed: {listing}); "
            f"add it with: pip install metering-{name}"
        )


class ValidationError(MeteringError, ValueError):
    """Input was refused before anything changed; names the field and the value."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.errors = errors or []


class UnsupportedOperationError(MeteringError):
    """The provider cannot do what was asked; its capabilities say so up front."""

    def __init__(self, provider: str, operation: str, detail: str | None = None) -> None:
        self.provider = provider
        self.operation = operation
        message = f"provider {provider!r} does not support {operation}"
        super().__init__(f"{message}: {detail}" if detail else message)


class NotFoundError(MeteringError):
    """The meter, customer or event named does not exist."""


class ConflictError(MeteringError):
    """The request clashes with existing state (e.g. a second meter for one event name)."""


class QueueFullError(MeteringError):
    """The ingestion queue stayed full for longer than the caller agreed to wait."""


class ProviderError(MeteringError):
    """The provider failed; `retryable` says whether trying again can help."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status_code = status_code
        self.retryable = retryable


class AuthenticationError(ProviderError):
    """The provider refused our credentials (401/403)."""


class RateLimitedError(ProviderError):
    """The provider asked us to slow down; `retry_after` is its wait, in seconds, if given."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, status_code=status_code, retryable=True)
        self.retry_after = retry_after


class ProviderUnavailableError(ProviderError):
    """The provider could not be reached or failed on its side (connection, timeout, 5xx)."""

    def __init__(self, message: str, *, provider: str, status_code: int | None = None) -> None:
        super().__init__(message, provider=provider, status_code=status_code, retryable=True)


ERROR_TYPES: tuple[tuple[type[MeteringError], str, int], ...] = (
    (ValidationError, "validation_error", 422),
    (UnsupportedOperationError, "unsupported_operation", 400),
    (NotFoundError, "not_found", 404),
    (ConflictError, "conflict", 409),
    (RateLimitedError, "rate_limited", 429),
    (QueueFullError, "queue_full", 503),
    (ProviderUnavailableError, "provider_unavailable", 503),
    (AuthenticationError, "provider_authentication", 503),
    (ProviderError, "provider_error", 503),
    (ConfigurationError, "configuration_error", 503),
    (MeteringError, "metering_error", 503),
)
"""Each error's wire type and HTTP status, most specific class first. A failure behind a
service (its store or provider down, refusing its credentials, misconfigured) is a 503 the
caller retries, never a 500: the caller's events are fine, and must wait, not be dropped."""


def wire_type(exc: MeteringError) -> tuple[str, int]:
    """The wire type and HTTP status of an error: its most specific row of `ERROR_TYPES`."""
    return next((kind, status) for cls, kind, status in ERROR_TYPES if isinstance(exc, cls))


MAX_MESSAGE = 500
"""Characters of a message carried across the wire: a huge echoed value stays bounded."""


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text`, cut to `limit` characters with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


_TYPE_BY_STATUS = {
    400: "validation_error",
    401: "provider_authentication",
    403: "provider_authentication",
    409: "conflict",
    413: "validation_error",
    422: "validation_error",
    429: "rate_limited",
}
"""What an answer without a known type (a proxy's, a gateway's) stands for, by status.
A 413 is a refused size (the pipeline splits the batch); anything else, a 404 or a 408
from a proxy mid-deploy included, is an outage: retried, never a lost event."""


def error_from_wire(
    kind: str,
    message: str,
    *,
    provider: str,
    operation: str,
    status: int,
    field: str | None = None,
    retry_after: float | None = None,
) -> MeteringError:
    """The exception a wire error stands for: by its type, else by its status alone. A 503
    (a failure behind the service) comes back as an outage, whatever its type."""
    message = clip(message)
    if kind not in {name for _, name, _ in ERROR_TYPES}:
        kind = _TYPE_BY_STATUS.get(status, "provider_unavailable")
    if kind == "validation_error":
        return ValidationError(message, field=field)
    if kind == "unsupported_operation":
        return UnsupportedOperationError(provider, operation, message)
    if kind == "not_found":
        return NotFoundError(message)
    if kind == "conflict":
        return ConflictError(message)
    if kind == "rate_limited":
        return RateLimitedError(message, provider=provider, retry_after=retry_after)
    if kind in ("provider_unavailable", "queue_full"):
        return ProviderUnavailableError(message, provider=provider, status_code=status)
    if kind == "configuration_error":
        message = f"the service is misconfigured: {message}"
    if status == 503:  # the service's own failure behind it, whatever its kind: retryable
        return ProviderUnavailableError(message, provider=provider, status_code=status)
    if kind == "provider_authentication":
        return AuthenticationError(message, provider=provider, status_code=status)
    return ProviderError(message, provider=provider, status_code=status)
