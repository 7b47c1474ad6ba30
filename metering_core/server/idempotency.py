"""`Idempotency-Key` on `POST /usage`: ids for the events a request sends without one.

An event's id is its idempotency key; a caller that sends none (a script, another
language's service) would have each event counted again on every retry of its request,
each retry drawing new ids. With the header, such an event's id derives from the key, the
caller's tenant and the event's place in the batch, so a retried request counts once (as
Stripe's and the IETF draft's Idempotency-Key make a retried request harmless). Events
that carry their own ids keep them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from metering_core.errors import ValidationError
from metering_core.models import UsageEvent

__all__ = ["MAX_KEY_LENGTH", "keyed_ids"]

MAX_KEY_LENGTH = 255


def keyed_ids(events: Sequence[UsageEvent], key: str, tenant: str | None) -> list[UsageEvent]:
    """`events`, each sent without an id given `key-<48 hex>` from (key, tenant, place)."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationError(
            f"Idempotency-Key={key[:MAX_KEY_LENGTH]!r} must be 1 to {MAX_KEY_LENGTH} "
            "printable characters",
            field="Idempotency-Key",
            value=key[:MAX_KEY_LENGTH],
        )
    scope = f"{len(key)}:{key}:{len(tenant or '')}:{tenant or ''}"
    keyed = []
    for place, event in enumerate(events):
        if "id" in event.model_fields_set:
            keyed.append(event)
            continue
        digest = hashlib.sha256(f"{scope}:{place}".encode()).hexdigest()[:48]
        keyed.append(event.model_copy(update={"id": f"key-{digest}"}))
    return keyed
