"""`POST /events`: event-bus messages (EventBridge, or CloudEvents in structured, binary or
batched mode), routed as `handle_event` routes them, with the caller's rights."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import TypeAdapter

from metering_core.errors import MeteringError, ValidationError
from metering_core.events import ParsedEvent, parse_event, route
from metering_core.models import MAX_EVENTS_PER_REQUEST, Customer, IngestResult
from metering_core.server.acting import ActingAs, check_batch
from metering_core.server.auth import Principal
from metering_core.server.callers import Caller
from metering_core.server.errors import AfterActing, Forbidden
from metering_core.server.event_bodies import BATCH, event_messages
from metering_core.server.query import known_query_only
from metering_core.server.service import Service, service

router = APIRouter(dependencies=[Depends(known_query_only)])

Answer = IngestResult | Customer | None
_ANSWERS = TypeAdapter(list[Answer])
_ONE = TypeAdapter(Answer)
_MESSAGE = {"type": "object", "description": "An EventBridge envelope or a CloudEvent"}
_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _MESSAGE},
        "application/cloudevents+json": {"schema": _MESSAGE},
        BATCH: {
            "schema": {
                "type": "array",
                "items": _MESSAGE,
                "minItems": 1,
                "maxItems": MAX_EVENTS_PER_REQUEST,
            }
        },
    },
}


def _may(principal: Principal, parsed: ParsedEvent) -> None:
    """Refuse (403) a message this caller may not act on, before any message acts."""
    principal.need("usage:write" if parsed.kind == "ingest" else "customers:write")
    if parsed.customer is not None:
        principal.own_tenant(parsed.customer.id, "create customer")
    if parsed.tenant_id is not None:
        principal.may_delete_customer()


@router.post(
    "/events",
    response_model=Answer | list[Answer],
    openapi_extra={"requestBody": _BODY},
)
async def handle_event(
    request: Request, principal: Caller, shared: Annotated[Service, Depends(service)]
) -> Response:
    """An event-bus message, as `handle_event` takes it, or a batch of CloudEvents (each
    answered in turn, in a list); ingestion answers per event, like `POST /usage`. Every
    message of a batch is validated, and the caller's right to each and its size
    checked, before any acts; one that fails in the store after others acted is
    answered saying so."""
    if not principal.scopes & {"usage:write", "customers:write"}:
        raise Forbidden("this key lacks the scope 'usage:write' or 'customers:write'")
    messages, batch = event_messages(request.headers, await request.body())
    if len(messages) > MAX_EVENTS_PER_REQUEST:
        raise ValidationError(
            f"a batch of {len(messages)} messages; at most {MAX_EVENTS_PER_REQUEST}",
            field="body",
            value=len(messages),
        )
    parsed = [parse_event(message) for message in messages]
    for one in parsed:
        _may(principal, one)
        if one.kind == "ingest":  # a batch no store takes: refused before any message acts
            await check_batch(shared, "events", len(one.usage))
    acting = ActingAs(shared, principal)
    answers: list[Any] = []
    for index, one in enumerate(parsed):
        try:
            answers.append(await route(one, acting))
        except MeteringError as error:
            if index:
                raise AfterActing(error, index, len(parsed)) from error
            raise
    content = _ANSWERS.dump_json(answers) if batch else _ONE.dump_json(answers[0])
    return Response(content, media_type="application/json")
