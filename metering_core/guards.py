"""Checks the facade runs before calling a provider: capabilities, so an unsupported
request fails fast with a message naming the provider and what it lacks; and names a
caller gives (ids in a path or a list), so text no store can hold fails as bad input."""

from __future__ import annotations

import pydantic
from pydantic import TypeAdapter

from metering_core import rules
from metering_core.errors import ProviderError, UnsupportedOperationError, ValidationError
from metering_core.interface import Capabilities, Operation
from metering_core.models import (
    EventQuery,
    MeterCreate,
    MeterUpdate,
    Page,
    StoredEvent,
    Text,
    UsageQuery,
    describe_error,
)


def require_operation(caps: Capabilities, provider: str, operation: Operation) -> None:
    if not caps.supports(operation):
        raise UnsupportedOperationError(provider, operation.value)


def check_meter_create(caps: Capabilities, provider: str, meter: MeterCreate) -> None:
    require_operation(caps, provider, Operation.CREATE_METER)
    if meter.aggregation not in caps.aggregations:
        supported = ", ".join(sorted(caps.aggregations))
        raise UnsupportedOperationError(
            provider,
            Operation.CREATE_METER.value,
            f"aggregation={meter.aggregation.value!r} is not supported (supported: {supported})",
        )
    if meter.dimensions and not caps.dimensions:
        raise UnsupportedOperationError(
            provider,
            Operation.CREATE_METER.value,
            f"dimensions={meter.dimensions!r}: this provider keeps no dimensions",
        )


def check_meter_update(caps: Capabilities, provider: str, update: MeterUpdate) -> None:
    require_operation(caps, provider, Operation.UPDATE_METER)
    refused = sorted(update.model_fields_set - caps.updatable_meter_fields)
    if refused:
        allowed = ", ".join(sorted(caps.updatable_meter_fields)) or "none"
        raise UnsupportedOperationError(
            provider,
            Operation.UPDATE_METER.value,
            f"cannot change {', '.join(refused)} (changeable: {allowed})",
        )


def check_usage_query(caps: Capabilities, provider: str, query: UsageQuery) -> None:
    require_operation(caps, provider, Operation.FETCH_USAGE)
    if query.window is not None and query.window not in caps.windows:
        supported = ", ".join(sorted(caps.windows)) or "none"
        raise UnsupportedOperationError(
            provider,
            Operation.FETCH_USAGE.value,
            f"window={query.window.value!r} is not supported (supported: {supported})",
        )
    if query.group_by and not caps.group_by:
        raise UnsupportedOperationError(
            provider, Operation.FETCH_USAGE.value, f"group_by={list(query.group_by)!r}: no group-by"
        )
    if (query.filters or query.customer_ids) and not caps.filters:
        refused = "filters" if query.filters else "customer_ids"
        raise UnsupportedOperationError(
            provider,
            Operation.FETCH_USAGE.value,
            f"{refused}={getattr(query, refused)!r}: this provider cannot filter usage",
        )
    if caps.requires_customer and query.customer_id is None:
        raise ValidationError(
            f"provider {provider!r} needs customer_id to fetch usage (customer_id=None)",
            field="customer_id",
            value=None,
        )


def check_event_query(caps: Capabilities, provider: str, query: EventQuery) -> None:
    require_operation(caps, provider, Operation.LIST_USAGE_EVENTS)
    if (query.filters or query.customer_ids) and not caps.filters:
        refused = "filters" if query.filters else "customer_ids"
        raise UnsupportedOperationError(
            provider,
            Operation.LIST_USAGE_EVENTS.value,
            f"{refused}={getattr(query, refused)!r}: this provider cannot filter events",
        )


def check_event_page(provider: str, query: EventQuery, page: Page[StoredEvent]) -> None:
    """Refuse a page holding an event the query leaves out: a provider (a plugin, a
    service behind the HTTP provider) that ignored `customer_ids`, a filter or
    `include_cancelled` would have its page taken as the events behind a number (an
    audit, a dispute, an export loaded elsewhere) and be believed."""
    if len(page.items) > query.limit:
        raise ProviderError(
            f"provider {provider!r} listed {len(page.items)} events on a page of at most "
            f"limit={query.limit}: no page of it is used",
            provider=provider,
        )
    customers = rules.admitted_customers(query.customer_id, query.customer_ids)
    filters = {key: frozenset(values) for key, values in query.filters.items()}
    for event in page.items:
        if query.event_name is not None and event.event_name != query.event_name:
            left_out = f"event_name={event.event_name!r}"
        elif customers is not None and event.customer_id not in customers:
            left_out = f"customer_id={event.customer_id!r}"
        elif not rules.admits(filters, event.dimensions):
            left_out = f"dimensions={event.dimensions!r}"
        elif event.cancelled and not query.include_cancelled:
            left_out = "cancelled=True"
        elif not query.start <= event.timestamp < query.end:
            left_out = f"timestamp={event.timestamp.isoformat()}"
        else:
            continue
        raise ProviderError(
            f"provider {provider!r} listed event {event.id!r} ({left_out}) that the query "
            "leaves out: it ignores part of the query, and no page of it is used",
            provider=provider,
        )


_TEXT = TypeAdapter(Text)


def check_name(field: str, value: str) -> None:
    """Refuse an id no store can hold, as the models refuse such text (`Text`: no NUL,
    which PostgreSQL refuses; no lone surrogate, which has no UTF-8). Nothing stored has
    such an id, and asking for one failed on PostgreSQL as a provider error (502) and on
    SQLite as an internal one."""
    try:
        _TEXT.validate_python(value)
    except pydantic.ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        _, message = describe_error({**error, "loc": (field,)})
        raise ValidationError(message, field=field, value=value) from None
