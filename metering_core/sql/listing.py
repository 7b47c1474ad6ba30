"""Stored events of a meter, a page at a time: keyset pagination on (timestamp, id), so
page 10,000 costs what page 1 does (the index is entered at the cursor, never counted up
to it as OFFSET would). Ids break ties in byte order, so every store lists alike."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from metering_core import rules
from metering_core.cursors import decode_event_cursor, encode_event_cursor
from metering_core.epoch import epoch_micros, from_epoch_micros
from metering_core.models import EventQuery, Page, StoredEvent
from metering_core.sql.rows import Trusted
from metering_core.sql.schema import events
from metering_core.sql.usage import filtered

__all__ = ["event_page", "events_statement"]

_COLUMNS = (
    events.c.id,
    events.c.event_name,
    events.c.customer_id,
    events.c.ts,
    events.c.value,
    sa.cast(events.c.dimensions, sa.Text).label("dimensions"),  # decoded once per distinct text
    events.c.cancelled,
    events.c.ingested_at,
)


def events_statement(
    dialect: str, meter_seq: int, query: EventQuery, filters: Mapping[str, frozenset[str]]
) -> sa.Select[Any]:
    """One page and one row more (so the page knows whether another follows)."""
    after = decode_event_cursor(query.cursor)
    start = epoch_micros(query.start) if after is None else max(after[0], epoch_micros(query.start))
    conditions = [
        events.c.meter_seq == meter_seq,
        events.c.ts >= start,  # one lower bound, the cursor's: the index is entered there
        events.c.ts < epoch_micros(query.end),
        *filtered(dialect, filters, events.c.dimensions),
    ]
    customers = rules.admitted_customers(query.customer_id, query.customer_ids)
    if customers is not None and len(customers) == 1:
        conditions.append(events.c.customer_id == next(iter(customers)))  # as it was planned
    elif customers is not None:
        conditions.append(events.c.customer_id.in_(sorted(customers)))
    if not query.include_cancelled:
        conditions.append(events.c.cancelled == sa.false())
    tie = events.c.id.collate("C") if dialect == "postgresql" else events.c.id  # SQLite: bytes
    if after is not None:
        conditions.append(sa.tuple_(events.c.ts, tie) > sa.tuple_(*after))
    return sa.select(*_COLUMNS).where(*conditions).order_by(events.c.ts, tie).limit(query.limit + 1)


_stored_event = Trusted(StoredEvent)


def event_page(rows: Sequence[Any], limit: int) -> Page[StoredEvent]:
    """The page the rows make; a cursor when the extra row shows another page follows.
    Dimensions, values and ingest times repeat across events (a few regions, a few
    prices, one time per stored batch): each distinct one is decoded once per page."""
    page = rows[:limit]
    last = page[-1] if len(rows) > limit else None
    dimensions: dict[str, dict[str, str]] = {}
    values: dict[Any, Decimal] = {}
    times: dict[int | None, Any] = {None: None}
    items = []
    for event_id, event_name, customer_id, ts, value, text, cancelled, ingested in page:
        found = dimensions.get(text)
        if found is None:
            found = dimensions[text] = json.loads(text)
        amount = values.get(value)
        if amount is None:
            amount = values[value] = rules.canonical(Decimal(value))
        stored = times.get(ingested, _UNSEEN)
        if stored is _UNSEEN:
            stored = times[ingested] = from_epoch_micros(ingested)
        items.append(
            _stored_event(
                {
                    "id": event_id,
                    "event_name": event_name,
                    "customer_id": customer_id,
                    "timestamp": from_epoch_micros(ts),
                    "value": amount,
                    "dimensions": dict(found),  # a copy each: a caller may change one event's
                    "cancelled": bool(cancelled),
                    "ingested_at": stored,
                },
            )
        )
    return Page[StoredEvent](
        items=items,
        next_cursor=None if last is None else encode_event_cursor(last.ts, last.id),
    )


_UNSEEN = object()
