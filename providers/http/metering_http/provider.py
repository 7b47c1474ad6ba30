"""The HTTP provider: the ten operations, and the listing of stored events, over the REST
contract, with httpx."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pydantic
from pydantic import BaseModel, TypeAdapter

from metering_core.errors import MeteringError, ProviderUnavailableError, ValidationError
from metering_core.interface import BaseProvider, Capabilities, Operation
from metering_core.models import (
    CancelResult,
    Customer,
    CustomerCreate,
    EventQuery,
    IngestResult,
    Meter,
    MeterCreate,
    MeterUpdate,
    Page,
    StoredEvent,
    Usage,
    UsageEvent,
    UsageQuery,
)
from metering_http.errors import error_from_response, error_from_transport
from metering_http.settings import HttpSettings

__all__ = ["HttpProvider"]

_EVENTS = TypeAdapter(list[UsageEvent])


M = TypeVar("M", bound=BaseModel)


def _answer(model: type[M], response: httpx.Response) -> M:
    """A success answer in the contract's shape; anything else (a proxy's page answered
    with 200) is an outage to retry, never a lost event."""
    try:
        return model.model_validate_json(response.content)
    except (pydantic.ValidationError, MeteringError) as exc:
        raise ProviderUnavailableError(
            f"HTTP {response.status_code} from the metering service is not a {model.__name__} "
            f"({len(response.content)} bytes, not shown)",
            provider="http",
            status_code=response.status_code,
        ) from exc


def _segment(value: str) -> str:
    """An id as one path segment: '/', '?', '#' and spaces cannot change the route."""
    return quote(value, safe="")


def _filter_params(filters: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """Filters as the service reads them, `filter=key:value` per value; a key holding ':'
    cannot be told from its value there, so it is refused here, not sent as another."""
    for key in filters:
        if ":" in key:
            raise ValidationError(
                f"filters: the key {key!r} holds ':', which the REST service reads as the "
                "end of the key",
                field="filters",
                value=key,
            )
    return [("filter", f"{key}:{value}") for key, values in filters.items() for value in values]


class HttpProvider(BaseProvider):
    """Speaks to a metering service (`metering serve`, or any backend of the same contract).

    Its capabilities are the service's, fetched once from `GET /capabilities` when first
    needed, without blocking the event loop (`load_capabilities`). Ingestion never needs
    them: the pipeline sends modest batches until the service has stated its limit.
    """

    name = "http"

    def __init__(self, settings: HttpSettings) -> None:
        self._settings = settings
        headers = {"Accept": "application/json"}
        if settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(
            base_url=settings.base_url,
            headers=headers,
            timeout=settings.timeout,
            limits=httpx.Limits(max_connections=settings.max_connections),
        )
        self._capabilities: Capabilities | None = None

    def __repr__(self) -> str:
        return f"HttpProvider(base_url={self._settings.base_url!r})"

    def known_capabilities(self) -> Capabilities | None:
        """The service's, once asked (None before: only the service can say)."""
        return self._capabilities

    async def load_capabilities(self) -> Capabilities:
        """The service's, from `GET /capabilities`, asked once: `ingest_usage_events` needs
        the batch size on every call."""
        if self._capabilities is None:
            try:
                response = await self._client.get("/capabilities")
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise error_from_transport(exc) from exc
            if response.is_error:
                raise error_from_response(response, "capabilities")
            self._capabilities = _answer(Capabilities, response)
        return self._capabilities

    async def _call(
        self, operation: Operation, method: str, path: str, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise error_from_transport(exc) from exc
        if response.is_error:
            raise error_from_response(response, operation.value)
        return response

    async def create_meter(self, meter: MeterCreate) -> Meter:
        body = meter.model_dump(mode="json", exclude_unset=True)
        response = await self._call(Operation.CREATE_METER, "POST", "/meters", json=body)
        return _answer(Meter, response)

    async def fetch_meter(self, meter_id: str) -> Meter:
        response = await self._call(Operation.FETCH_METER, "GET", f"/meters/{_segment(meter_id)}")
        return _answer(Meter, response)

    async def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await self._call(Operation.FETCH_ALL_METERS, "GET", "/meters", params=params)
        return _answer(Page[Meter], response)

    async def update_meter(self, meter_id: str, update: MeterUpdate) -> Meter:
        body = update.model_dump(mode="json", exclude_unset=True)
        response = await self._call(
            Operation.UPDATE_METER, "PUT", f"/meters/{_segment(meter_id)}", json=body
        )
        return _answer(Meter, response)

    async def delete_meter(self, meter_id: str) -> None:
        await self._call(Operation.DELETE_METER, "DELETE", f"/meters/{_segment(meter_id)}")

    async def ingest_usage_events(
        self, events: Sequence[UsageEvent], *, lowering_refused: bool = False
    ) -> IngestResult:
        """In requests of the service's `max_batch_size`; when `/capabilities` does not
        answer, as given (the pipeline sends a modest default): ingestion must not depend
        on any route but `POST /usage`. A batch the service finds too large is refused
        whole, and the pipeline splits it. (`lowering_refused`: not over HTTP; a tenant's
        own key is refused there by the service itself.)"""
        if lowering_refused:
            raise self.unsupported(
                Operation.INGEST_USAGE_EVENTS, "it cannot refuse events that lower usage"
            )
        try:
            await self.load_capabilities()
        except MeteringError:
            return await self.ingest_batch(events)
        return await super().ingest_usage_events(events)

    async def ingest_batch(self, events: Sequence[UsageEvent]) -> IngestResult:
        body = b'{"events":' + _EVENTS.dump_json(list(events)) + b"}"
        response = await self._call(
            Operation.INGEST_USAGE_EVENTS,
            "POST",
            "/usage",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        return _answer(IngestResult, response)

    async def fetch_usage(self, query: UsageQuery) -> Usage:
        params: list[tuple[str, str]] = [
            ("start", query.start.isoformat()),
            ("end", query.end.isoformat()),
        ]
        params += [("tz", query.tz)] + [("group_by", key) for key in query.group_by]
        if query.customer_id is not None:
            params.append(("customer_id", query.customer_id))
        if query.window is not None:
            params.append(("window", query.window.value))
        params += _filter_params(query.filters)
        params += [("customer_ids", customer) for customer in query.customer_ids]
        response = await self._call(
            Operation.FETCH_USAGE, "GET", f"/usage/{_segment(query.meter_id)}", params=params
        )
        return _answer(Usage, response)

    async def list_usage_events(self, query: EventQuery) -> Page[StoredEvent]:
        params: list[tuple[str, str]] = [
            ("start", query.start.isoformat()),
            ("end", query.end.isoformat()),
            ("limit", str(query.limit)),
            ("include_cancelled", "true" if query.include_cancelled else "false"),
        ]
        for name in ("meter_id", "event_name", "customer_id", "cursor"):
            value = getattr(query, name)
            if value is not None:
                params.append((name, value))
        params += _filter_params(query.filters)
        params += [("customer_ids", customer) for customer in query.customer_ids]
        response = await self._call(
            Operation.LIST_USAGE_EVENTS, "GET", "/usage/events", params=params
        )
        return _answer(Page[StoredEvent], response)

    async def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        """In requests of at most the service's `max_batch_size` ids, like ingestion."""
        size = (await self.load_capabilities()).max_batch_size
        cancelled: list[str] = []
        not_found: list[str] = []
        rejected: dict[str, str] = {}
        for offset in range(0, len(event_ids), size):
            body = {"event_ids": list(event_ids[offset : offset + size]), "event_name": event_name}
            response = await self._call(
                Operation.CANCEL_USAGE_EVENTS, "DELETE", "/usage", json=body
            )
            part = _answer(CancelResult, response)
            cancelled += part.cancelled
            not_found += part.not_found
            rejected.update(part.rejected)
        return CancelResult(cancelled=cancelled, not_found=not_found, rejected=rejected)

    async def create_customer(self, customer: CustomerCreate) -> Customer:
        body = customer.model_dump(mode="json")
        response = await self._call(Operation.CREATE_CUSTOMER, "POST", "/customers", json=body)
        return _answer(Customer, response)

    async def delete_customer(self, customer_id: str) -> None:
        await self._call(Operation.DELETE_CUSTOMER, "DELETE", f"/customers/{_segment(customer_id)}")

    async def aclose(self) -> None:
        await self._client.aclose()
