"""`/usage`: send usage events, read aggregated usage, cancel events."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import StringConstraints

from metering_core.models import TEXT_PATTERN, CancelResult, IngestResult, Usage, Window
from metering_core.server.acting import ActingAs, check_batch
from metering_core.server.auth import Principal
from metering_core.server.callers import identify, needs
from metering_core.server.idempotency import keyed_ids
from metering_core.server.query import known_query_only, refuse_unknown_query
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


# The hot path of a fleet: no dependency solving (three levels of it cost a tenth of a
# one-event request), the body validated in one pass from its bytes and the answer
# serialised in one call (FastAPI's own body handling parses the JSON to Python objects
# first and validates those after, at twice the cost).
@router.post("", response_model=IngestResult, **usage_batch_route())
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


@router.get("/{meter_id}", response_model=Usage, dependencies=[Depends(known_query_only)])
async def fetch_usage(
    meter_id: str,
    principal: Annotated[Principal, Depends(needs("usage:read"))],
    shared: Shared,
    start: datetime,
    end: datetime,
    customer_id: Annotated[
        str | None, Query(min_length=1, max_length=100, pattern=TEXT_PATTERN)
    ] = None,
    window: Window | None = None,
    group_by: Annotated[list[GroupKey] | None, Query()] = None,
    tz: str = "UTC",
) -> Response:
    # Up to MAX_ROWS rows: computed and serialised off the event loop, in slices that
    # each hold the GIL briefly, so a large answer cannot delay other requests.
    if principal.tenant is not None:
        customer_id = customer_id or principal.tenant
        principal.own_tenant(customer_id, "read usage of")
    usage = await shared.metering.fetch_usage(
        meter_id,
        customer_id=customer_id,
        start=start,
        end=end,
        window=window,
        group_by=group_by or (),
        tz=tz,
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
