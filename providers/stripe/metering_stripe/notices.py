"""Stripe's meter error reports, received by webhook: thin events whose signature the SDK
verifies (and whose timestamp it holds to five minutes, so a replay is refused), and
whose details (the sampled identifiers Stripe refused, and why) are fetched from Stripe."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import stripe

from metering_core.errors import ConfigurationError, ValidationError
from metering_core.models import RefusalNotice
from metering_stripe.errors import translate

__all__ = ["REFUSALS", "read_notice"]

REFUSALS = frozenset({"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"})
"""The thin event types that report meter events Stripe refused after accepting them."""

TOLERANCE = 300
"""Seconds a signed notice stays valid (Stripe's own default)."""


async def read_notice(
    client: stripe.StripeClient,
    secret: str | None,
    body: bytes,
    headers: Mapping[str, str],
    recorded: Callable[[str], Awaitable[bool]] | None = None,
    secrets: Sequence[str] = (),
) -> RefusalNotice | None:
    """The refusals a verified notice reports; None for another kind of event, and for
    one `recorded` already (a replay within the five minutes: not fetched again)."""
    if secret is None:
        raise ConfigurationError(
            "the Stripe mirror has no webhook_secret (METERING_STRIPE_WEBHOOK_SECRET, or "
            "its mirror option): it cannot verify Stripe's notices"
        )
    signature = headers.get("stripe-signature")
    try:  # the SDK decodes the body first: bytes that are not UTF-8 verify nothing
        stripe.WebhookSignature.verify_header(body, signature, secret, TOLERANCE)
    except (stripe.SignatureVerificationError, UnicodeDecodeError) as exc:
        raise ValidationError(
            "the notice's Stripe-Signature does not verify with the mirror's webhook secret, "
            "or is older than five minutes"
            + ("" if signature else " (no Stripe-Signature header)"),
            field="Stripe-Signature",
        ) from exc
    try:  # signed, so the SDK's parse of it failing is its shape, not its signature
        notification: Any = client.parse_event_notification(
            body, signature, secret, tolerance=TOLERANCE
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValidationError(
            "the notice verifies but is not one of Stripe's thin events (an event "
            "destination sending snapshot events, or a body of another shape): "
            f"{type(exc).__name__}: {str(exc)[:200]}",
            field="body",
        ) from exc
    if notification.type not in REFUSALS:
        return None
    if recorded is not None and await recorded(notification.id):
        return None
    try:
        event: Any = await notification.fetch_event_async()
    except stripe.StripeError as exc:
        raise translate(exc, secrets) from exc
    reason = event.data.reason
    refused = {
        sample.request.identifier: f"Stripe refused it later ({kind.code}): {sample.error_message}"
        for kind in reason.error_types
        for sample in kind.sample_errors
    }
    return RefusalNotice(
        id=notification.id,
        kind=notification.type,
        error_count=reason.error_count,
        refused=refused,
    )
