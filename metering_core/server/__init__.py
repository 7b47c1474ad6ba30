"""The REST service: the metering API over HTTP, for app fleets that send usage centrally.

`create_app(metering, keys=...)` returns a FastAPI app. Clients send
`Authorization: Bearer <key>`; each key has scopes and may be bound to one tenant, whose
usage is then the only usage it can write, read or cancel. `POST /usage` delivers before
it answers and reports each event, so the client (which keeps the queue and the retries)
knows what became of every id. Errors share one shape: `{"error": {"type", "message", "field"?}}`.
"""

from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Response

from metering_core.client import AsyncMetering
from metering_core.config import ApiKey, Scope
from metering_core.errors import ConfigurationError, ValidationError
from metering_core.events import parse_event
from metering_core.interface import Capabilities
from metering_core.models import (
    CancelResult,
    Customer,
    CustomerCreate,
    IngestResult,
    Meter,
    MeterCreate,
    MeterUpdate,
    Page,
    Usage,
    UsageEvent,
    UsageQuery,
    Window,
)
from metering_core.server.auth import Credentials, Keys, Principal
from metering_core.server.errors import ERROR_TYPES, Forbidden, install_error_handlers
from metering_core.server.schemas import CancelRequest, Health, UsageBatch

__all__ = ["ERROR_TYPES", "create_app", "serve"]

OWNERS_REMEMBERED = 1_000_000
"""Event ids whose tenant the service remembers, so tenant keys can cancel their own events."""


def create_app(
    metering: AsyncMetering | None = None,
    *,
    keys: Mapping[Any, ApiKey | Mapping[str, Any]] | None = None,
    allow_anonymous: bool = False,
) -> FastAPI:
    """The REST service over `metering` (built from configuration when omitted).

    `keys` maps each API key to `{"scopes": [...], "tenant": None | "<tenant id>"}`; when
    omitted they come from configuration (`METERING_KEYS`, or `[tool.metering.keys]`). With
    no keys at all the service refuses to start unless `allow_anonymous=True`, which grants
    every scope to every caller (for a trusted local network only).
    """
    service = metering or AsyncMetering()
    gate = Keys(keys if keys is not None else service.settings.keys)
    if not gate and not allow_anonymous:
        raise ConfigurationError(
            "no API keys configured for the REST service: pass keys=..., set METERING_KEYS, "
            "or allow_anonymous=True for a trusted local network"
        )
    require = gate.require
    owners: OrderedDict[str, str] = OrderedDict()

    async def deliver(events: list[UsageEvent]) -> IngestResult:
        """Deliver now and remember who first sent each accepted id: a duplicate sent
        under another tenant must not make that tenant its owner (and able to cancel it)."""
        result = await service.deliver_usage_events(events)
        accepted = set(result.accepted)
        for event in events:
            if event.id in accepted and event.id not in owners:
                owners[event.id] = event.customer_id
        while len(owners) > OWNERS_REMEMBERED:
            owners.popitem(last=False)
        return result

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.close()

    app = FastAPI(title="metering-core", version="1", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", provider=service.provider_name)

    @app.get("/capabilities")
    async def capabilities(credentials: Credentials) -> Capabilities:
        """Any valid key may read them: a client needs them to send usage at all."""
        gate.authenticate(credentials)
        return service.capabilities

    @app.post("/meters", status_code=201, dependencies=[Depends(require("meters:write"))])
    async def create_meter(meter: MeterCreate) -> Meter:
        return await service.create_meter(meter)

    @app.get("/meters", dependencies=[Depends(require("meters:read"))])
    async def list_meters(
        limit: Annotated[int, Query(ge=1, le=100)] = 100, cursor: str | None = None
    ) -> Page[Meter]:
        return await service.fetch_all_meters(limit=limit, cursor=cursor)

    @app.get("/meters/{meter_id}", dependencies=[Depends(require("meters:read"))])
    async def fetch_meter(meter_id: str) -> Meter:
        return await service.fetch_meter(meter_id)

    @app.put("/meters/{meter_id}", dependencies=[Depends(require("meters:write"))])
    async def update_meter(meter_id: str, update: MeterUpdate) -> Meter:
        return await service.update_meter(meter_id, update)

    @app.delete(
        "/meters/{meter_id}", status_code=204, dependencies=[Depends(require("meters:write"))]
    )
    async def delete_meter(meter_id: str) -> Response:
        await service.delete_meter(meter_id)
        return Response(status_code=204)

    @app.post("/usage")
    async def ingest(
        batch: UsageBatch, principal: Annotated[Principal, Depends(require("usage:write"))]
    ) -> IngestResult:
        for event in batch.events:
            principal.own_tenant(event.customer_id, "write usage for")
        limit = service.capabilities.max_batch_size
        if len(batch.events) > limit:
            raise ValidationError(
                f"events: {len(batch.events)} events exceed max_batch_size={limit}",
                field="events",
                value=len(batch.events),
            )
        return await deliver(batch.events)

    @app.get("/usage/{meter_id}")
    async def fetch_usage(
        meter_id: str,
        principal: Annotated[Principal, Depends(require("usage:read"))],
        start: datetime,
        end: datetime,
        customer_id: str | None = None,
        window: Window | None = None,
        group_by: Annotated[list[str] | None, Query()] = None,
        tz: str = "UTC",
    ) -> Usage:
        if principal.tenant is not None:
            customer_id = customer_id or principal.tenant
            principal.own_tenant(customer_id, "read usage of")
        query = UsageQuery(
            meter_id=meter_id,
            customer_id=customer_id,
            start=start,
            end=end,
            window=window,
            group_by=tuple(group_by or ()),
            tz=tz,
        )
        return await service.fetch_usage(query)

    @app.delete("/usage")
    async def cancel(
        request: CancelRequest, principal: Annotated[Principal, Depends(require("usage:write"))]
    ) -> CancelResult:
        limit = service.capabilities.max_batch_size
        if len(request.event_ids) > limit:
            raise ValidationError(
                f"event_ids: {len(request.event_ids)} ids exceed max_batch_size={limit}",
                field="event_ids",
                value=len(request.event_ids),
            )
        if principal.tenant is not None:
            foreign = [i for i in request.event_ids if owners.get(i) != principal.tenant]
            if foreign:
                raise Forbidden(
                    f"this key is bound to tenant {principal.tenant!r} and cannot cancel "
                    f"events it did not send through this service: {foreign[:10]!r}"
                )
        return await service.cancel_usage_events(request.event_ids, event_name=request.event_name)

    @app.post("/events")
    async def handle_event(
        message: dict[str, Any], credentials: Credentials
    ) -> IngestResult | Customer | None:
        """An event-bus message (EventBridge or CloudEvent), as `handle_event` takes it;
        ingestion answers per event, like `POST /usage`."""
        principal = gate.authenticate(credentials)
        parsed = parse_event(message)
        scope: Scope = "usage:write" if parsed.kind == "ingest" else "customers:write"
        if scope not in principal.scopes:
            raise Forbidden(f"this key lacks the scope {scope!r}")
        if parsed.kind == "ingest":
            for event in parsed.usage:
                principal.own_tenant(event.customer_id, "write usage for")
            return await deliver(parsed.usage)
        if parsed.customer is not None:
            principal.own_tenant(parsed.customer.id, "create customer")
            return await service.create_customer(parsed.customer)
        principal.own_tenant(parsed.tenant_id, "delete customer")
        assert parsed.tenant_id is not None
        await service.delete_customer(parsed.tenant_id)
        return None

    @app.post("/customers", status_code=201)
    async def create_customer(
        customer: CustomerCreate,
        principal: Annotated[Principal, Depends(require("customers:write"))],
    ) -> Customer:
        principal.own_tenant(customer.id, "create customer")
        return await service.create_customer(customer)

    @app.delete("/customers/{customer_id:path}", status_code=204)
    async def delete_customer(
        customer_id: str, principal: Annotated[Principal, Depends(require("customers:write"))]
    ) -> Response:
        principal.own_tenant(customer_id, "delete customer")
        await service.delete_customer(customer_id)
        return Response(status_code=204)

    return app


def serve(
    app_or_metering: FastAPI | AsyncMetering | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_anonymous: bool = False,
) -> None:
    """Run the service with uvicorn until stopped; loopback unless told otherwise."""
    import uvicorn

    app = (
        app_or_metering
        if isinstance(app_or_metering, FastAPI)
        else create_app(app_or_metering, allow_anonymous=allow_anonymous)
    )
    uvicorn.run(app, host=host, port=port)
