"""The exception hierarchy: every failure a caller can catch, from one root."""

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
