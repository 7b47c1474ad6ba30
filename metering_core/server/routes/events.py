"""`POST /events`: an event-bus message (EventBridge or CloudEvent), routed as
`handle_event` routes it, with the caller's rights."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from metering_core.events import parse_event, route
from metering_core.models import Customer, IngestResult
from metering_core.server.acting import ActingAs
from metering_core.server.callers import Caller
from metering_core.server.errors import Forbidden
from metering_core.server.service import Service, service

router = APIRouter()


@router.post("/events")
async def handle_event(
    message: dict[str, Any], principal: Caller, shared: Annotated[Service, Depends(service)]
) -> IngestResult | Customer | None:
    """An event-bus message (EventBridge or CloudEvent), as `handle_event` takes it;
    ingestion answers per event, like `POST /usage`."""
    if not principal.scopes & {"usage:write", "customers:write"}:
        raise Forbidden("this key lacks the scope 'usage:write' or 'customers:write'")
    parsed = parse_event(message)
    principal.need("usage:write" if parsed.kind == "ingest" else "customers:write")
    answer: IngestResult | Customer | None = await route(parsed, ActingAs(shared, principal))
    return answer
