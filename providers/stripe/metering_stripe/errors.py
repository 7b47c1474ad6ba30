"""Stripe SDK errors as the core's exceptions, always raised `from` the original."""

from __future__ import annotations

import stripe

from metering_core.errors import (
    AuthenticationError,
    ConflictError,
    MeteringError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
    ValidationError,
)

PROVIDER = "stripe"


def _retry_after(exc: stripe.StripeError) -> float | None:
    value = (exc.headers or {}).get("Retry-After") or (exc.headers or {}).get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def translate(exc: stripe.StripeError) -> MeteringError:
    """The core exception for a Stripe error; Stripe's own messages mask API keys."""
    status = exc.http_status
    message = f"Stripe: {exc.user_message or str(exc)}".strip()
    if isinstance(exc, stripe.RateLimitError) or status == 429:
        return RateLimitedError(
            message, provider=PROVIDER, status_code=status, retry_after=_retry_after(exc)
        )
    if isinstance(exc, stripe.APIConnectionError):
        return ProviderUnavailableError(message, provider=PROVIDER)
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError) or status in (401, 403):
        return AuthenticationError(message, provider=PROVIDER, status_code=status)
    if isinstance(exc, stripe.InvalidRequestError):
        if status == 404:
            return NotFoundError(message)
        if exc.code == "resource_already_exists":
            return ConflictError(message)
        return ValidationError(message, field=exc.param, value=None)
    if status is None or status == 409 or status >= 500:
        return ProviderUnavailableError(message, provider=PROVIDER, status_code=status)
    return ProviderError(message, provider=PROVIDER, status_code=status)
