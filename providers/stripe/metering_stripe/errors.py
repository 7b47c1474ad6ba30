"""Stripe SDK errors as the core's exceptions, always raised `from` the original."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


SHORTEST_MASKED = 8
"""Secrets shorter than this are not masked: every occurrence of a short word would be."""


def masked(text: str, secrets: Iterable[str]) -> str:
    """`text` without any of `secrets`. Stripe masks API keys in its messages; a server
    at `base_url` that is not Stripe (a proxy, a mock) may echo the key it was sent, and
    the message would carry it into every log line and dead letter that quotes it
    (probe)."""
    for secret in secrets:
        if len(secret) >= SHORTEST_MASKED:
            text = text.replace(secret, "**********")
    return text


def _scrub(exc: stripe.StripeError, secrets: Sequence[str]) -> None:
    """Mask `secrets` in the SDK's error itself too: it stays the translated error's
    cause, which a traceback shows."""
    said = [exc.user_message or "", exc.http_body or "", repr(exc.json_body)]
    if not any(secret in text for secret in secrets for text in said if secret):
        return
    exc._message = masked(exc.user_message or "", secrets)
    exc.http_body = masked(exc.http_body or "", secrets)
    exc.json_body = None
    exc.error = None
    exc.args = (exc._message,)


def translate(exc: stripe.StripeError, secrets: Sequence[str] = ()) -> MeteringError:
    """The core exception for a Stripe error, without any of `secrets` (the key and the
    session token the request carried) in its message or its cause."""
    _scrub(exc, [secret for secret in secrets if len(secret) >= SHORTEST_MASKED])
    status = exc.http_status
    message = masked(f"Stripe: {exc.user_message or str(exc)}".strip(), secrets)
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
