"""The REST service's app: the metering API over HTTP, for app fleets that send usage
centrally.

`create_app(metering, keys=...)` returns a FastAPI app. Clients send
`Authorization: Bearer <key>`; each key has scopes and may be bound to one tenant, whose
usage is then the only usage it can write, read or cancel, in that tenant's own space of
event ids. `POST /usage` delivers before
it answers and reports each event, so the client (which keeps the queue and the retries)
knows what became of every id. Errors share one shape: `{"error": {"type", "message", "field"?}}`.
"""

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import Scope

from metering_core.client import AsyncMetering
from metering_core.errors import ConfigurationError, ValidationError
from metering_core.events import parse_event, route
from metering_core.interface import Capabilities
from metering_core.models import (
    MAX_EVENTS_PER_REQUEST,
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
from metering_core.server.auth import Gate, GatewayClaims, Keys, Principal, require
from metering_core.server.body_limit import MAX_BODY_BYTES, BodyLimit
from metering_core.server.errors import Forbidden, install_error_handlers
from metering_core.server.key_first import KeyFirst
from metering_core.server.metrics import CONTENT_TYPE, RequestMetrics, ServiceMetrics
from metering_core.server.schemas import (
    CancelRequest,
    Health,
    documented,
    read_usage_batch,
    usage_batch_route,
    usage_json,
)
from metering_core.server.settings import ApiKey, configured_keys
from metering_core.server.tenant_meters import MeterAggregations

__all__ = ["create_app", "serve"]

_CALLER = "metering.caller"
"""Where a request's scope keeps the caller its key named, once looked up."""


def create_app(
    metering: AsyncMetering | None = None,
    *,
    keys: Mapping[Any, ApiKey | Mapping[str, Any]] | None = None,
    allow_anonymous: bool = False,
    config_file: Path | str | None = None,
    public_metrics: bool = False,
    gateway: GatewayClaims | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The REST service over `metering` (built from configuration when omitted).

    `keys` maps each API key to `{"scopes": [...], "tenant": None | "<tenant id>"}`; when
    omitted they come from configuration (`METERING_KEYS`, or `[tool.metering.keys]`). With
    no keys at all the service refuses to start unless `allow_anonymous=True`, which grants
    every scope to every caller (for a trusted local network only). `GET /metrics` needs
    the `metrics:read` scope unless `public_metrics` (a scraper on a private network).
    With `gateway` (AWS Lambda behind API Gateway), callers are who the gateway's JWT
    authorizer says they are, and keys are not used. A request body over `max_body_bytes`
    is refused (413) before it is read whole: one caller cannot fill the service's memory.
    """
    gate: Gate = (
        gateway
        if gateway is not None
        else Keys(keys if keys is not None else configured_keys(config_file))
    )
    if not gate and not allow_anonymous:
        raise ConfigurationError(
            "no API keys configured for the REST service: pass keys=..., set METERING_KEYS, "
            "or allow_anonymous=True for a trusted local network"
        )
    service = metering or AsyncMetering(config_file=config_file)
    metrics = ServiceMetrics(service.stats)
    aggregations = MeterAggregations(service)

    def key_holder(headers: Headers) -> Principal:
        """The caller a request's bearer key names (keys mode), parsed as FastAPI's
        HTTPBearer parses it for the routes that depend on it."""
        assert isinstance(gate, Keys)
        scheme, token = get_authorization_scheme_param(headers.get("authorization"))
        bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token)
        return gate.authenticate(bearer if scheme.lower() == "bearer" and token else None)

    async def caller(request: Request) -> Principal:
        if isinstance(gate, GatewayClaims):
            return await gate.principal(request)
        principal = request.scope[_CALLER] = key_holder(request.headers)
        return principal

    def known_key(scope: Scope) -> None:
        """`KeyFirst`'s check; a caller `caller` already named is not looked up again."""
        if _CALLER not in scope:
            scope[_CALLER] = key_holder(Headers(scope=scope))

    async def within_batch_limit(field: str, count: int) -> None:
        limit = (await service.load_capabilities()).max_batch_size
        if count > limit:
            raise ValidationError(
                f"{field}: {count} exceed max_batch_size={limit}", field=field, value=count
            )

    class Gateway:
        """The service acting for one caller: its rights applied, then the facade called.
        The event router (`POST /events`) and the plain routes both act through it."""

        def __init__(self, principal: Principal) -> None:
            self.principal = principal

        async def ingest_usage_events(self, events: Sequence[UsageEvent], /) -> IngestResult:
            """Deliver now, in the caller's id space; answer per id as the caller sent it,
            the events this caller may not write among the rejected."""
            await within_batch_limit("events", len(events))
            kinds = {}
            if self.principal.tenant is not None:
                kinds = await aggregations.of({event.event_name for event in events})
            stored, sent, refused = self.principal.outgoing(events, kinds)
            answer = await service.deliver_usage_events(stored) if stored else IngestResult()
            result = self.principal.ingest_answer(answer, sent)
            result.rejected.update(refused)
            metrics.count_ingested(result)
            return result

        async def create_customer(self, customer: CustomerCreate, /) -> Customer:
            self.principal.own_tenant(customer.id, "create customer")
            return await service.create_customer(customer)

        async def delete_customer(self, customer_id: str, /) -> None:
            self.principal.own_tenant(customer_id, "delete customer")
            await service.delete_customer(customer_id)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.close()

    app = FastAPI(title="metering-core", version="1", lifespan=lifespan)
    app.openapi = documented(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.state.max_body_bytes = max_body_bytes
    if isinstance(gate, Keys) and gate:  # behind a gateway, the gateway checked first
        app.add_middleware(KeyFirst, check=known_key)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        """Prometheus text format; a key with `metrics:read`, or none if made public."""
        if not public_metrics:
            (await caller(request)).need("metrics:read")
        return Response(metrics.page(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", provider=service.provider_name)

    @app.get("/capabilities")
    async def capabilities(
        principal: Annotated[Principal, Depends(gate.principal)],
    ) -> Capabilities:
        """Any valid key may read them: a client needs them to send usage at all.
        `max_batch_size` is at most 10,000, the most one request may carry."""
        # whatever the provider takes: a client splitting to more would be refused
        offered = await service.load_capabilities()
        size = min(offered.max_batch_size, MAX_EVENTS_PER_REQUEST)
        return offered.model_copy(update={"max_batch_size": size})

    @app.post("/meters", status_code=201, dependencies=[Depends(require(gate, "meters:write"))])
    async def create_meter(meter: MeterCreate) -> Meter:
        try:
            return await service.create_meter(meter)
        finally:
            aggregations.forget()

    @app.get("/meters", dependencies=[Depends(require(gate, "meters:read"))])
    async def list_meters(
        limit: Annotated[int, Query(ge=1, le=100)] = 100, cursor: str | None = None
    ) -> Page[Meter]:
        return await service.fetch_all_meters(limit=limit, cursor=cursor)

    @app.get("/meters/{meter_id}", dependencies=[Depends(require(gate, "meters:read"))])
    async def fetch_meter(meter_id: str) -> Meter:
        return await service.fetch_meter(meter_id)

    @app.put("/meters/{meter_id}", dependencies=[Depends(require(gate, "meters:write"))])
    async def update_meter(meter_id: str, update: MeterUpdate) -> Meter:
        return await service.update_meter(meter_id, update)

    @app.delete(
        "/meters/{meter_id}", status_code=204, dependencies=[Depends(require(gate, "meters:write"))]
    )
    async def delete_meter(meter_id: str) -> Response:
        try:
            await service.delete_meter(meter_id)
        finally:
            aggregations.forget()
        return Response(status_code=204)

    # The hot path of a fleet: the caller is checked without FastAPI's dependency solving
    # (three levels of it cost a tenth of a one-event request), the body is validated in
    # one pass from its bytes and the answer serialised in one call (FastAPI's own body
    # handling parses the JSON to Python objects first and validates those after, at
    # twice the cost).
    @app.post("/usage", response_model=IngestResult, **usage_batch_route(bearer=gateway is None))
    async def ingest(request: Request) -> Response:
        principal = await caller(request)
        principal.need("usage:write")
        batch = read_usage_batch(await request.body(), request.headers.get("content-type"))
        result = await Gateway(principal).ingest_usage_events(batch.events)
        return Response(result.model_dump_json(), media_type="application/json")

    @app.get("/usage/{meter_id}", response_model=Usage)
    async def fetch_usage(
        meter_id: str,
        principal: Annotated[Principal, Depends(require(gate, "usage:read"))],
        start: datetime,
        end: datetime,
        customer_id: str | None = None,
        window: Window | None = None,
        group_by: Annotated[list[str] | None, Query()] = None,
        tz: str = "UTC",
    ) -> Response:
        # Up to MAX_ROWS rows: computed and serialised off the event loop, in slices that
        # each hold the GIL briefly, so a large answer cannot delay other requests.
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
        usage = await service.fetch_usage(query)
        return Response(await asyncio.to_thread(usage_json, usage), media_type="application/json")

    @app.delete("/usage")
    async def cancel(
        request: CancelRequest,
        principal: Annotated[Principal, Depends(require(gate, "usage:write"))],
    ) -> CancelResult:
        """A tenant-bound key names ids in its own space, so it can cancel only what it sent."""
        await within_batch_limit("event_ids", len(request.event_ids))
        sent = {principal.stored_id(i): i for i in request.event_ids}
        result = await service.cancel_usage_events(list(sent), event_name=request.event_name)
        return principal.cancel_answer(result, sent if principal.tenant is not None else {})

    @app.post("/events")
    async def handle_event(
        message: dict[str, Any], principal: Annotated[Principal, Depends(gate.principal)]
    ) -> IngestResult | Customer | None:
        """An event-bus message (EventBridge or CloudEvent), as `handle_event` takes it;
        ingestion answers per event, like `POST /usage`."""
        if not principal.scopes & {"usage:write", "customers:write"}:
            raise Forbidden("this key lacks the scope 'usage:write' or 'customers:write'")
        parsed = parse_event(message)
        principal.need("usage:write" if parsed.kind == "ingest" else "customers:write")
        answer: IngestResult | Customer | None = await route(parsed, Gateway(principal))
        return answer

    @app.post("/customers", status_code=201)
    async def create_customer(
        customer: CustomerCreate,
        principal: Annotated[Principal, Depends(require(gate, "customers:write"))],
    ) -> Customer:
        return await Gateway(principal).create_customer(customer)

    @app.delete("/customers/{customer_id:path}", status_code=204)
    async def delete_customer(
        customer_id: str, principal: Annotated[Principal, Depends(require(gate, "customers:write"))]
    ) -> Response:
        await Gateway(principal).delete_customer(customer_id)
        return Response(status_code=204)

    return app


def serve(
    app_or_metering: FastAPI | AsyncMetering | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_anonymous: bool = False,
    config_file: Path | str | None = None,
    public_metrics: bool = False,
    log_config: dict[str, Any] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Run the service with uvicorn until stopped; loopback unless told otherwise.
    `log_config` (a `logging.config.dictConfig` mapping) replaces uvicorn's default. The
    app's own options (keys, metrics, body limit) apply when this builds the app; an app
    given ready-made keeps those it was made with."""
    import uvicorn

    app = (
        app_or_metering
        if isinstance(app_or_metering, FastAPI)
        else create_app(
            app_or_metering,
            allow_anonymous=allow_anonymous,
            config_file=config_file,
            public_metrics=public_metrics,
            max_body_bytes=max_body_bytes,
        )
    )
    if log_config is None:
        uvicorn.run(app, host=host, port=port)
    else:
        uvicorn.run(app, host=host, port=port, log_config=log_config)
