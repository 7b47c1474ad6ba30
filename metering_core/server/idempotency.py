"""`Idempotency-Key` on `POST /usage`: ids for the events a request sends without one.

An event's id is its idempotency key; a caller that sends none (a script, another
language's service) would have each event counted again on every retry of its request,
each retry drawing new ids. With the header, such an event's id derives from the key, the
caller (its API key's digest or its token's subject), its tenant, the event's place in the
batch and the fields it sent, so a retried request counts once (as Stripe's and the IETF
draft's Idempotency-Key make a retried request harmless). Two callers, or one caller
reusing a key for other events, never share ids: nobody's usage is taken for a duplicate.
Events that carry their own ids keep them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from metering_core.errors import ValidationError
from metering_core.models import UsageEvent

__all__ = ["MAX_KEY_LENGTH", "keyed_ids"]

MAX_KEY_LENGTH = 255


def _sent(event: UsageEvent) -> str:
    """The fields the caller sent (a timestamp it left out is the service's, and changes
    on a retry), in one form."""
    fields = event.model_dump(mode="json", include=event.model_fields_set - {"id"})
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def keyed_ids(
    events: Sequence[UsageEvent], key: str, caller: str, tenant: str | None
) -> list[UsageEvent]:
    """`events`, each sent without an id given `key-<48 hex>` from (caller, tenant, key,
    place, the fields sent)."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationError(
            f"Idempotency-Key={key[:MAX_KEY_LENGTH]!r} must be 1 to {MAX_KEY_LENGTH} "
            "printable characters",
            field="Idempotency-Key",
            value=key[:MAX_KEY_LENGTH],
        )
    scope = json.dumps([caller, tenant, key])
    keyed = []
    for place, event in enumerate(events):
        if "id" in event.model_fields_set:
            keyed.append(event)
            continue
        named = f"{scope}:{place}:{_sent(event)}".encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(named).hexdigest()[:48]
        keyed.append(event.model_copy(update={"id": f"key-{digest}"}))
    return keyed
