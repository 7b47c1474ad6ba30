"""`/usage`: send usage events, read aggregated usage, cancel events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from metering_core.export import ExportFormat, export_keys, header, piece
from metering_core.models import (
    MAX_CURSOR_LENGTH,
    MAX_CUSTOMER_IDS,
    MAX_EVENTS_PER_PAGE,
    SLUG_PATTERN,
    TEXT_PATTERN,
    CancelResult,
    EventQuery,
    IngestResult,
    Page,
    StoredEvent,
    Usage,
    UtcDatetime,
    UtcEnd,
    Window,
)
from metering_core.server.acting import ActingAs, check_batch
from metering_core.server.auth import Principal
from metering_core.server.callers import identify, needs
from metering_core.server.idempotency import keyed_ids
from metering_core.server.own_handler import OwnHandler
from metering_core.server.query import (
    FILTER_PATTERN,
    find_meter,
    known_query_only,
    parse_filters,
    refuse_unknown_query,
)
from metering_core.server.schemas import (
    CancelRequest,
    read_usage_batch,
    usage_batch_route,
    usage_json,
)
from metering_core.server.service import Service, service

router = APIRouter(prefix="/usage")
GroupKey = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=TEXT_PATTERN)]
Shared = Annotated[Service, Depends(service)]
Reader = Annotated[Principal, Depends(needs("usage:read"))]
Name = Annotated[str | None, Query(min_length=1, max_length=100, pattern=TEXT_PATTERN)]
EventName = Annotated[str | None, Query(pattern=SLUG_PATTERN)]
FilterParam = Annotated[
    list[Annotated[str, StringConstraints(max_length=300, pattern=FILTER_PATTERN)]] | None,
    Query(
        description="`key:value`, repeatable: values of one key are OR-ed, keys AND-ed "
        "(the key is what comes before the first ':')."
    ),
]


# The hot path of a fleet: no dependency solving (`OwnHandler`), the body validated in
# one pass from its bytes and the answer serialised in one call (FastAPI's own body
# handling parses the JSON to Python objects first and validates those after, at twice
# the cost).
async def ingest(request: Request) -> Response:
    principal = identify(request.scope)
    principal.need("usage:write")
    refuse_unknown_query(request)
    batch = read_usage_batch(await request.body(), request.headers.get("content-type"))
    key = request.headers.get("idempotency-key")
    events = (
        batch.events
        if key is None
        else keyed_ids(batch.events, key, principal.caller, principal.tenant)
    )
    result = await ActingAs(request.app.state.service, principal).ingest_usage_events(events)
    return Response(result.model_dump_json(), media_type="application/json")


router.add_api_route(
    "",
    ingest,
    methods=["POST"],
    response_model=IngestResult,
    route_class_override=OwnHandler,
    **usage_batch_route(),
)


CustomerIds = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=TEXT_PATTERN)]]
    | None,
    Query(max_length=MAX_CUSTOMER_IDS),
]
"""Only these customers' events (repeat the parameter per customer)."""


@router.get("/events", response_model=Page[StoredEvent], dependencies=[Depends(known_query_only)])
async def list_events(
    principal: Reader,
    shared: Shared,
    start: UtcDatetime,
    end: UtcEnd,
    meter_id: Name = None,
    event_name: EventName = None,
    customer_id: Name = None,
    filter: FilterParam = None,  # the query parameter's name
    customer_ids: CustomerIds = None,
    include_cancelled: bool = False,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PER_PAGE)] = 100,
    cursor: Annotated[str | None, Query(min_length=1, max_length=MAX_CURSOR_LENGTH)] = None,
) -> Page[StoredEvent]:
    """The events stored for a meter (`meter_id` or `event_name`), oldest first, a page at
    a time: the events behind a usage number. A tenant-bound key sees only its tenant's,
    under the ids the service stored them by."""
    return await shared.metering.list_usage_events(
        meter_id,
        event_name=event_name,
        customer_id=_own(principal, customer_id),
        start=start,
        end=end,
        filters=parse_filters(filter),
        customer_ids=_own_all(principal, customer_ids),
        include_cancelled=include_cancelled,
        limit=limit,
        cursor=cursor,
    )


@router.get(
    "/events/export",
    dependencies=[Depends(known_query_only)],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The events, streamed",
            "content": {"text/csv": {}, "application/x-ndjson": {}},
        }
    },
)
async def export_events(
    principal: Reader,
    shared: Shared,
    start: UtcDatetime,
    end: UtcEnd,
    meter_id: Name = None,
    event_name: EventName = None,
    customer_id: Name = None,
    filter: FilterParam = None,
    customer_ids: CustomerIds = None,
    format: ExportFormat = ExportFormat.jsonl,
) -> StreamingResponse:
    """Every event `GET /usage/events` would page through (cancelled ones left out), as
    CSV or JSON Lines that `metering ingest` reads back, streamed in constant memory. A
    failure after the first byte cuts the stream short of its end (the client sees an
    incomplete response, never a file that looks whole)."""
    metering = shared.metering
    customer_id = _own(principal, customer_id)  # a tenant naming another: 403 before any read
    listed = _own_all(principal, customer_ids)
    meter = await find_meter(metering, meter_id, event_name)
    query = EventQuery(
        meter_id=meter.id,
        customer_id=customer_id,
        start=start,
        end=end,
        filters=parse_filters(filter),
        customer_ids=listed,
        limit=MAX_EVENTS_PER_PAGE,
    )
    first = await metering.list_usage_events(query)  # a refusal is a status, not a stream
    keys = export_keys(meter.dimensions, meter.unique_dimension)

    async def pieces() -> AsyncIterator[str]:
        yield header(format, keys)
        page = first
        while True:
            yield piece(page.items, format, keys)
            if page.next_cursor is None:
                return
            page = await metering.list_usage_events(
                query.model_copy(update={"cursor": page.next_cursor})
            )

    return StreamingResponse(pieces(), media_type=format.media_type)


def _own_all(principal: Principal, customer_ids: list[str] | None) -> list[str]:
    """`customer_ids`, each the caller's to read (403 for another tenant's)."""
    for listed in customer_ids or ():
        principal.own_tenant(listed, "read usage of")
    return customer_ids or []


def _own(principal: Principal, customer_id: str | None) -> str | None:
    """The customer a read is confined to: a tenant-bound key's own tenant (403 for
    another's)."""
    if principal.tenant is None:
        return customer_id
    customer_id = customer_id or principal.tenant
    principal.own_tenant(customer_id, "read usage of")
    return customer_id


@router.get("/{meter_id}", response_model=Usage, dependencies=[Depends(known_query_only)])
async def fetch_usage(
    meter_id: str,
    principal: Reader,
    shared: Shared,
    start: UtcDatetime,
    end: UtcEnd,
    customer_id: Name = None,
    window: Window | None = None,
    group_by: Annotated[list[GroupKey] | None, Query()] = None,
    tz: str = "UTC",
    filter: FilterParam = None,
    customer_ids: CustomerIds = None,
) -> Response:
    # Up to MAX_ROWS rows: computed and serialised off the event loop, in slices that
    # each hold the GIL briefly, so a large answer cannot delay other requests.
    customer_id = _own(principal, customer_id)
    listed = _own_all(principal, customer_ids)
    usage = await shared.metering.fetch_usage(
        meter_id,
        customer_id=customer_id,
        start=start,
        end=end,
        window=window,
        group_by=group_by or (),
        tz=tz,
        filters=parse_filters(filter),
        customer_ids=listed,
    )
    return Response(await asyncio.to_thread(usage_json, usage), media_type="application/json")


@router.delete("", dependencies=[Depends(known_query_only)])
async def cancel(
    request: CancelRequest,
    principal: Annotated[Principal, Depends(needs("usage:write"))],
    shared: Shared,
) -> CancelResult:
    """Cancelling is the operator's correction: a tenant-bound caller, which must not lower
    its own usage, has every id refused and nothing cancelled."""
    await check_batch(shared, "event_ids", len(request.event_ids))
    if principal.tenant is not None:
        return principal.refuse_cancel(request.event_ids)
    return await shared.metering.cancel_usage_events(
        request.event_ids, event_name=request.event_name
    )
