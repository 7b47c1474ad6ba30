"""The REST service: the metering API over HTTP, for app fleets that send usage centrally.

`create_app(metering, keys=...)` returns a FastAPI app. Clients send
`Authorization: Bearer <key>`; each key has scopes and may be bound to one tenant, whose
usage is then the only usage it can write, read or cancel. `POST /usage` delivers before
it answers and reports each event, so the client (which keeps the queue and the retries)
knows what became of every id. Errors share one shape: `{"error": {"type", "message", "field"?}}`.
"""

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, get_args

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from metering_core.client import AsyncMetering
from metering_core.config import ApiKey, Scope
from metering_core.errors import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    MeteringError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    QueueFullError,
    RateLimitedError,
    UnsupportedOperationError,
    ValidationError,
)
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
    describe_error,
)

__all__ = ["ERROR_TYPES", "create_app", "serve"]

OWNERS_REMEMBERED = 1_000_000
"""Event ids whose tenant the service remembers, so tenant keys can cancel their own events."""

ERROR_TYPES: dict[type[MeteringError], tuple[str, int]] = {
    ValidationError: ("validation_error", 422),
    UnsupportedOperationError: ("unsupported_operation", 400),
    NotFoundError: ("not_found", 404),
    ConflictError: ("conflict", 409),
    RateLimitedError: ("rate_limited", 429),
    QueueFullError: ("queue_full", 503),
    ProviderUnavailableError: ("provider_unavailable", 503),
    AuthenticationError: ("provider_authentication", 502),
    ProviderError: ("provider_error", 502),
    ConfigurationError: ("configuration_error", 500),
    MeteringError: ("metering_error", 500),
}
"""Error type names and statuses, most specific first; the HTTP provider maps them back."""


class UsageBatch(BaseModel):
    """`POST /usage`: events to deliver (at most the service's `max_batch_size`)."""

    model_config = ConfigDict(extra="forbid")
    events: list[UsageEvent] = Field(min_length=1)


class CancelRequest(BaseModel):
    """`DELETE /usage`: ids to cancel, and the event name where the provider needs it."""

    model_config = ConfigDict(extra="forbid")
    event_ids: list[str] = Field(min_length=1)
    event_name: str | None = None


class Health(BaseModel):
    status: str
    provider: str


class Principal:
    """Who is calling: the scopes of their key and the tenant it is bound to, if any."""

    def __init__(self, key: ApiKey) -> None:
        self.scopes = key.scopes
        self.tenant = key.tenant


class Forbidden(Exception):
    def __init__(self, message: str, status_code: int = 403) -> None:
        super().__init__(message)
        self.status_code = status_code


def _error(
    kind: str, message: str, status_code: int, field: str | None = None, **headers: str
) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status_code, headers=headers or None)


def _metering_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MeteringError)
    kind, status_code = next(v for t, v in ERROR_TYPES.items() if isinstance(exc, t))
    headers = {}
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    field = exc.field if isinstance(exc, ValidationError) else None
    return _error(kind, str(exc), status_code, field, **headers)


def _request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    texts = [describe_error(error)[1] for error in errors]
    return _error(
        "validation_error", "invalid request: " + "; ".join(texts), 422, ".".join(location) or None
    )


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Unknown routes and methods (404, 405) answer in the one error shape too."""
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "http_error"
    return _error(kind, str(exc.detail), exc.status_code, **(exc.headers or {}))


def _forbidden(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Forbidden)
    kind = "unauthorized" if exc.status_code == 401 else "forbidden"
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {}
    return _error(kind, str(exc), exc.status_code, **headers)


def _digest(key: str) -> bytes:
    """Keys are compared by SHA-256, so every comparison has the same length and cost."""
    return hashlib.sha256(key.encode()).digest()


def _load_keys(keys: Mapping[Any, ApiKey | Mapping[str, Any]]) -> list[tuple[bytes, ApiKey]]:
    loaded = []
    for secret, spec in keys.items():
        text = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
        loaded.append(
            (_digest(text), spec if isinstance(spec, ApiKey) else ApiKey.model_validate(spec))
        )
    return loaded


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
    known = _load_keys(keys if keys is not None else service.settings.keys)
    if not known and not allow_anonymous:
        raise ConfigurationError(
            "no API keys configured for the REST service: pass keys=..., set METERING_KEYS, "
            "or allow_anonymous=True for a trusted local network"
        )
    owners: OrderedDict[str, str] = OrderedDict()
    bearer = HTTPBearer(auto_error=False)

    def authenticate(credentials: HTTPAuthorizationCredentials | None) -> Principal:
        if not known:
            return Principal(ApiKey(scopes=frozenset(get_args(Scope))))
        if credentials is None:
            raise Forbidden("missing API key: send Authorization: Bearer <key>", 401)
        offered = _digest(credentials.credentials)
        match: ApiKey | None = None
        for secret, spec in known:  # compare against every key: timing says nothing
            if hmac.compare_digest(secret, offered):
                match = spec
        if match is None:
            raise Forbidden("unknown API key", 401)
        return Principal(match)

    def require(scope: Scope) -> Callable[..., Principal]:
        def dependency(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> Principal:
            principal = authenticate(credentials)
            if scope not in principal.scopes:
                raise Forbidden(f"this key lacks the scope {scope!r}")
            return principal

        return dependency

    def own_tenant(principal: Principal, customer_id: str | None, what: str) -> None:
        if principal.tenant is not None and customer_id != principal.tenant:
            raise Forbidden(
                f"this key is bound to tenant {principal.tenant!r} "
                f"and cannot {what} {customer_id!r}"
            )

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
    app.add_exception_handler(MeteringError, _metering_error)
    app.add_exception_handler(RequestValidationError, _request_error)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(HTTPException, _http_error)

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", provider=service.provider_name)

    @app.get("/capabilities")
    async def capabilities(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Capabilities:
        """Any valid key may read them: a client needs them to send usage at all."""
        authenticate(credentials)
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
            own_tenant(principal, event.customer_id, "write usage for")
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
            own_tenant(principal, customer_id, "read usage of")
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
        message: dict[str, Any],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> IngestResult | Customer | None:
        """An event-bus message (EventBridge or CloudEvent), as `handle_event` takes it;
        ingestion answers per event, like `POST /usage`."""
        principal = authenticate(credentials)
        parsed = parse_event(message)
        scope: Scope = "usage:write" if parsed.kind == "ingest" else "customers:write"
        if scope not in principal.scopes:
            raise Forbidden(f"this key lacks the scope {scope!r}")
        if parsed.kind == "ingest":
            for event in parsed.usage:
                own_tenant(principal, event.customer_id, "write usage for")
            return await deliver(parsed.usage)
        if parsed.customer is not None:
            own_tenant(principal, parsed.customer.id, "create customer")
            return await service.create_customer(parsed.customer)
        own_tenant(principal, parsed.tenant_id, "delete customer")
        assert parsed.tenant_id is not None
        await service.delete_customer(parsed.tenant_id)
        return None

    @app.post("/customers", status_code=201)
    async def create_customer(
        customer: CustomerCreate,
        principal: Annotated[Principal, Depends(require("customers:write"))],
    ) -> Customer:
        own_tenant(principal, customer.id, "create customer")
        return await service.create_customer(customer)

    @app.delete("/customers/{customer_id:path}", status_code=204)
    async def delete_customer(
        customer_id: str, principal: Annotated[Principal, Depends(require("customers:write"))]
    ) -> Response:
        own_tenant(principal, customer_id, "delete customer")
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


if __name__ == "__main__":  # python -m metering_core.server > docs/openapi.json
    import json
    import sys

    document = create_app(AsyncMetering("memory"), allow_anonymous=True).openapi()
    json.dump(document, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
