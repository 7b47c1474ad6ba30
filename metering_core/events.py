"""Event-triggered functions: event-bus messages parsed, and routed to ingestion and
onboarding. Pure: parsing and one router; the facade, the REST service and the Lambda
handler all act through it.

`handle_event` takes an EventBridge envelope (`{"detail-type": ..., "detail": {...}}`) or a
CloudEvent (`{"type": ..., "data": {...}}`), so an existing sbt-aws application can switch
to this library without changing the events it publishes. Everything is validated before
anything happens: an unknown type or a malformed detail raises `ValidationError` and
changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from metering_core.errors import NotFoundError, ValidationError
from metering_core.models import MAX_EVENTS_PER_REQUEST, CustomerCreate, UsageEvent

__all__ = ["EventTarget", "ParsedEvent", "parse_event", "route"]

logger = logging.getLogger("metering")

Kind = Literal["ingest", "onboard", "offboard"]

NAMES: dict[str, Kind] = {
    "INGEST_USAGE": "ingest",
    "ingestUsage": "ingest",
    "sbt_aws_ingestUsage": "ingest",
    "ONBOARDING_REQUEST": "onboard",
    "onboardingRequest": "onboard",
    "sbt_aws_onboardingRequest": "onboard",
    "OFFBOARDING_REQUEST": "offboard",
    "offboardingRequest": "offboard",
    "sbt_aws_offboardingRequest": "offboard",
}

AMBERFLO_FIELDS = {
    "tenantId",
    "meterApiName",
    "meterValue",
    "uniqueId",
    "meterTimeInMillis",
    "time",
}


@dataclass(frozen=True)
class _Envelope:
    """What a message says of itself: its type, its detail, the key that makes it unique
    on its bus (None when it has none), and when it was sent (None when it does not say)."""

    name: str
    detail: Any
    key: str | None
    time: Any


@dataclass(frozen=True)
class ParsedEvent:
    """A validated event-bus message: what to do, and with what."""

    kind: Kind
    usage: list[UsageEvent]
    customer: CustomerCreate | None = None
    tenant_id: str | None = None


def _envelope(message: Any) -> _Envelope:
    """The message's type, detail, key and time. The key: an EventBridge event's `id`; a
    CloudEvent's `source` and `id` together, as the CloudEvents spec makes them unique (two
    sources may both send id "1"), folded into `ce-<40 hex digits of SHA-256>`. The time:
    the envelope's `time`, when the bus put the message on it."""
    if not isinstance(message, Mapping):
        raise ValidationError(f"event={message!r} is not an object", field="event", value=message)
    given = message.get("id")
    envelope_id = None if given is None or given == "" else str(given)  # 0 is an id
    sent = message.get("time")
    if "detail-type" in message:
        return _Envelope(str(message["detail-type"]), message.get("detail"), envelope_id, sent)
    if "type" in message:
        data = message.get("data")
        if data is None and "data_base64" in message:
            data = _decoded(message["data_base64"])
        source = str(message["source"]) if message.get("source") else None
        key = None
        if envelope_id is not None and source is not None:
            unique = f"{len(source)}:{source}{envelope_id}".encode("utf-8", "surrogatepass")
            key = "ce-" + hashlib.sha256(unique).hexdigest()[:40]
        return _Envelope(str(message["type"]), data, key, sent)
    raise ValidationError(
        "event has neither 'detail-type' (EventBridge) nor 'type' and 'data' (CloudEvent)",
        field="detail-type",
        value=None,
    )


def _decoded(encoded: Any) -> Any:
    """A CloudEvent's `data_base64`: base64 of the JSON of its data (one this service
    reads: an integer past Python's 4,300 digits, or nesting past its recursion limit, is
    refused like any other that is not)."""
    try:
        return json.loads(base64.b64decode(str(encoded), validate=True))
    except (binascii.Error, ValueError, RecursionError):
        raise ValidationError(
            "data_base64 is not base64 of a JSON document this service reads",
            field="data_base64",
            value=str(encoded)[:100],
        ) from None


SECONDS_LOOKALIKE = 10**11
"""Milliseconds below this are before 3 March 1973: a time in seconds (1.7e9 in 2026)
sent as milliseconds. Read as given, its usage was billed in January 1970, in no period
anyone invoices (probe), so it is refused."""


def _from_millis(millis: Any) -> datetime:
    """Epoch milliseconds as a moment (converted here: a bare number would be read as
    milliseconds again past 2e10); refused by name when not a usable number, or when it
    looks like seconds (`SECONDS_LOOKALIKE`). The range itself is checked by the model."""
    if isinstance(millis, int | float) and not isinstance(millis, bool):
        if millis < SECONDS_LOOKALIKE:
            raise ValidationError(
                f"meterTimeInMillis={millis!r} is before 1973 as milliseconds: it looks like "
                "seconds; send milliseconds since the epoch",
                field="meterTimeInMillis",
                value=millis,
            )
        try:
            return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
        except (OverflowError, ValueError):
            pass
    raise ValidationError(
        f"meterTimeInMillis={millis!r} must be a number of milliseconds since the epoch",
        field="meterTimeInMillis",
        value=millis,
    )


def _agreeing(detail: Mapping[str, Any]) -> None:
    """Refuse a detail that names its tenant twice, differently: billed to either, the
    other's usage would go to the wrong customer (probe: each shape picked another)."""
    named = {key: detail[key] for key in ("tenantId", "customer_id") if key in detail}
    if len(set(map(repr, named.values()))) > 1:
        raise ValidationError(
            f"detail.tenantId={named['tenantId']!r} and detail.customer_id="
            f"{named['customer_id']!r} name different tenants",
            field="customer_id",
            value=named["customer_id"],
        )


def _amberflo_dimension(key: Any, value: Any) -> str:
    """A top-level field of the Amberflo-style shape, as a dimension's text: a scalar as
    written; null, a list or an object refused (as text, `None` or a Python list's repr
    would be billed as a group of its own: probe)."""
    if value is None or isinstance(value, list | dict):
        raise ValidationError(
            f"dimensions.{key}={value!r}: a dimension is a string",
            field=f"dimensions.{key}",
            value=value,
        )
    return str(value)


def _usage_fields(detail: Mapping[str, Any]) -> dict[str, Any]:
    """The model's field names, the sbt-aws `tenantId`, or the Amberflo-style shape."""
    _agreeing(detail)
    if "meterApiName" in detail:
        if "value" in detail:  # a model field in the other shape: it would be a dimension
            raise ValidationError(
                f"detail.value={detail['value']!r}: with meterApiName the value is meterValue",
                field="value",
                value=detail["value"],
            )
        fields: dict[str, Any] = {
            "event_name": detail["meterApiName"],
            "customer_id": detail.get("tenantId"),
            "value": detail.get("meterValue", 1),
            "dimensions": {
                str(k): _amberflo_dimension(k, v)
                for k, v in detail.items()
                if k not in AMBERFLO_FIELDS
            },
        }
        if "uniqueId" in detail:
            fields["id"] = detail["uniqueId"]
        if "meterTimeInMillis" in detail:
            fields["timestamp"] = _from_millis(detail["meterTimeInMillis"])
        return fields
    fields = dict(detail)
    if "tenantId" in fields:
        fields.setdefault("customer_id", fields.pop("tenantId"))
    return fields


def _usage(detail: Any, envelope_id: str | None, sent: Any) -> list[UsageEvent]:
    """Usage events; one without an id takes `<message key>:<index>`, so a redelivered
    message is a duplicate rather than counted again. With neither, it is refused: a bus
    delivers at least once, and a fresh id each time would count every redelivery. One
    without a timestamp takes the envelope's time (`sent`): a dead-letter redrive days
    later must bill it when it was sent, not when it was processed."""
    items = detail if isinstance(detail, list) else [detail]
    if not items:
        raise ValidationError("detail holds no usage events", field="detail", value=detail)
    if len(items) > MAX_EVENTS_PER_REQUEST:
        raise ValidationError(
            f"detail holds {len(items)} usage events; at most {MAX_EVENTS_PER_REQUEST} a message",
            field="detail",
            value=len(items),
        )
    events = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValidationError(
                f"detail[{index}]={item!r} is not an object", field="detail", value=item
            )
        try:
            fields = _usage_fields(item)
            if "id" not in fields:
                if envelope_id is None:
                    raise ValidationError(
                        "has no id, and the message has none to take one from (an EventBridge "
                        "'id', or a CloudEvent 'source' and 'id'): a redelivery would be "
                        "counted again",
                        field="id",
                        value=None,
                    )
                fields["id"] = f"{envelope_id}:{index}"
            if "timestamp" not in fields and sent is not None:
                fields["timestamp"] = sent
            events.append(UsageEvent.model_validate(fields))
        except ValidationError as exc:
            raise ValidationError(
                f"detail[{index}]: {exc}", field=f"detail[{index}].{exc.field}", value=exc.value
            ) from None
    return events


def _tenant(detail: Mapping[str, Any]) -> str:
    _agreeing(detail)
    tenant = detail.get("tenantId", detail.get("customer_id", detail.get("id")))
    if not isinstance(tenant, str) or not tenant:
        raise ValidationError(
            f"detail.tenantId={tenant!r} must be a tenant id", field="tenantId", value=tenant
        )
    return tenant


def _customer(detail: Mapping[str, Any]) -> CustomerCreate:
    known = {"tenantId", "tenantName", "email", "customer_id", "id", "name"}
    metadata = {
        str(k): v if isinstance(v, str) else str(v) for k, v in detail.items() if k not in known
    }
    return CustomerCreate(
        id=_tenant(detail),
        name=detail.get("tenantName", detail.get("name")),
        email=detail.get("email"),
        metadata=metadata,
    )


def parse_event(message: Any) -> ParsedEvent:
    """Validate an event-bus message completely, before anything acts on it."""
    envelope = _envelope(message)
    name, detail = envelope.name, envelope.detail
    kind = NAMES.get(name)
    if kind is None:
        raise ValidationError(
            f"event type {name!r} is not one of {sorted(NAMES)}", field="detail-type", value=name
        )
    if kind == "ingest":
        return ParsedEvent(kind, _usage(detail, envelope.key, envelope.time))
    if not isinstance(detail, Mapping):
        raise ValidationError(f"detail={detail!r} is not an object", field="detail", value=detail)
    if kind == "onboard":
        return ParsedEvent(kind, [], customer=_customer(detail))
    return ParsedEvent(kind, [], tenant_id=_tenant(detail))


class EventTarget(Protocol):
    """What an event-bus message acts on: the facade itself, or a gateway that applies a
    caller's rights first (the REST service)."""

    async def ingest_usage_events(self, events: list[UsageEvent], /) -> Any: ...

    async def create_customer(self, customer: CustomerCreate, /) -> Any: ...

    async def delete_customer(self, customer_id: str, /) -> Any: ...


async def route(parsed: ParsedEvent, target: EventTarget) -> Any:
    """The one router: a parsed message to ingestion, onboarding or offboarding. Returns
    what the target answered (ids or a report, the customer, or None)."""
    if parsed.kind == "ingest":
        return await target.ingest_usage_events(parsed.usage)
    if parsed.customer is not None:
        return await target.create_customer(parsed.customer)
    assert parsed.tenant_id is not None
    try:
        await target.delete_customer(parsed.tenant_id)
    except NotFoundError:
        # A bus delivers at least once: a redelivered offboarding finds the tenant gone
        # already, which is the outcome it asked for.
        logger.info("offboarding %r: no such customer (already offboarded)", parsed.tenant_id)
    return None
