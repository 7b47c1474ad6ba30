"""The facades users hold: `AsyncMetering`, and `Metering`, its synchronous twin.

Both expose the ten operations with the same names and arguments. A method takes either
the model (`MeterCreate`, `UsageEvent`, …) or its fields as keyword arguments.
"""

from __future__ import annotations

import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Concatenate, ParamSpec, Self, TypeVar

import pydantic
from pydantic import Field, TypeAdapter

from metering_core import events as events_module
from metering_core import guards
from metering_core.capability_cache import CapabilityCache
from metering_core.collector import eased
from metering_core.config import (
    MeteringSettings,
    provider_name,
    resolve_provider_settings,
    resolve_settings,
)
from metering_core.errors import ConfigurationError, MeteringError, ValidationError
from metering_core.interface import (
    Capabilities,
    DeliversOnItsOwn,
    IMetering,
    Ledger,
    Operation,
)
from metering_core.loop import shared_loop
from metering_core.metrics import PipelineStats
from metering_core.models import (
    CancelResult,
    Customer,
    CustomerCreate,
    EventQuery,
    IngestResult,
    Meter,
    MeterCreate,
    MeterUpdate,
    MirrorLink,
    MirrorStatus,
    Page,
    ReconcileReport,
    StoredEvent,
    Usage,
    UsageEvent,
    UsageQuery,
    UtcDatetime,
    Window,
    _Model,
)
from metering_core.pipeline import Pipeline
from metering_core.plugins import get_provider, plugin_manager
from metering_core.spool import DeadLetter

__all__ = ["AsyncMetering", "Metering"]

M = TypeVar("M", bound=_Model)
P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

EventInput = UsageEvent | Mapping[str, Any]


def _coerce(model: type[M], value: M | Mapping[str, Any] | None, fields: Mapping[str, Any]) -> M:
    """The model itself, a mapping of its fields, or its fields as keyword arguments."""
    if value is None:
        return model(**fields)
    if fields:
        raise TypeError(f"pass a {model.__name__} or its fields as keyword arguments, not both")
    if isinstance(value, model):
        return value
    if isinstance(value, Mapping):
        return model.model_validate(value)
    raise ValidationError(
        f"expected a {model.__name__} or a mapping of its fields, got {value!r}",
        field=model.__name__,
        value=value,
    )


class Backfill(_Model):
    """`backfill_mirror`'s `mirror_added`, checked as every time the library takes (its
    errors read "invalid Backfill: mirror_added=…")."""

    mirror_added: UtcDatetime


_EVENTS = TypeAdapter(Annotated[list[UsageEvent], Field(fail_fast=True)])
"""A batch validated in one call into pydantic's core, stopping at the first bad event."""


EASED_FROM = 1_000
"""Events in a batch from which it is validated with young collections eased
(`collector.eased`, nothing frozen): its models are freed by reference counting, yet
every 700 made started a young collection, and every few hundred of those a full one
over the caller's whole heap."""


def _coerce_events(events: Iterable[EventInput]) -> list[UsageEvent]:
    """Validate every event before any is queued, so one bad row changes nothing. One pass
    over the batch; only a batch that fails it is walked again, to name the bad event."""
    listed = events if isinstance(events, list) else list(events)
    try:
        if len(listed) < EASED_FROM:
            return _EVENTS.validate_python(listed)
        with eased(freeze=False):
            return _EVENTS.validate_python(listed)
    except pydantic.ValidationError:
        pass
    checked: list[UsageEvent] = []
    for index, event in enumerate(listed):
        try:
            checked.append(_coerce(UsageEvent, event, {}))
        except ValidationError as exc:
            raise ValidationError(
                f"events[{index}]: {exc}", field=f"events[{index}].{exc.field}", value=exc.value
            ) from None
    return checked


def _listed(field: str, values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):  # "acme" would be read as the customers "a", "c", "m", "e"
        raise ValidationError(
            f"{field} must be a list, not one string ({values!r})", field=field, value=values
        )
    return tuple(values)


def _filters(filters: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """`{"region": ["eu"]}` as the models hold it; a key's values given as one string are
    refused (as `customer_ids`), not read letter by letter."""
    return {key: _listed(f"filters.{key}", values) for key, values in (filters or {}).items()}


def _build_provider(
    provider: str | IMetering | None,
    config_file: Path | str | None,
    library_options: Mapping[str, Any],
    provider_options: Mapping[str, Any],
) -> tuple[IMetering, MeteringSettings]:
    settings, file_table = resolve_settings(
        {"provider": provider if isinstance(provider, str) else None, **library_options},
        config_file=config_file,
    )
    if provider is not None and not isinstance(provider, str):
        return provider, settings
    name = provider_name(settings)
    spec = get_provider(name)
    provider_settings = resolve_provider_settings(
        spec.settings_model, name, file_table, provider_options
    )
    return spec.factory(provider_settings), settings


class AsyncMetering:
    """The async facade: one metering API over whichever provider configuration selects.

    It may be built outside a running event loop; background work starts on first use,
    in the loop that uses it.
    """

    def __init__(
        self,
        provider: str | IMetering | None = None,
        *,
        config_file: Path | str | None = None,
        **options: Any,
    ) -> None:
        """`options` naming a library setting (`spool_path`, `linger`, `max_queue`,
        `max_concurrency`, `max_attempts`, `retry_backoff`, `delivery_timeout`,
        `mirror_forwarder`) configure the library; the rest are the provider's options
        (e.g. `api_key`)."""
        library_options = {k: v for k, v in options.items() if k in MeteringSettings.model_fields}
        provider_options = {k: v for k, v in options.items() if k not in library_options}
        self._provider, self.settings = _build_provider(
            provider, config_file, library_options, provider_options
        )
        self._capabilities = CapabilityCache(self._provider)
        ledger = self._provider
        if isinstance(ledger, DeliversOnItsOwn):
            ledger.deliver_with(self.settings)
        forwarder = (
            ledger.forward_mirrors
            if self.settings.mirror_forwarder and isinstance(ledger, Ledger) and ledger.mirrored
            else None
        )
        self._pipeline = Pipeline(
            self._provider,
            self.settings,
            capabilities=self._capabilities,
            on_delivered=self._report_delivery,
            alongside=forwarder,
        )
        self._closed = False

    def _report_delivery(self, result: IngestResult) -> None:
        plugin_manager().hook.usage_delivered(provider=self.provider_name, result=result)

    @property
    def provider(self) -> IMetering:
        """The provider behind this facade."""
        return self._provider

    @property
    def provider_name(self) -> str:
        return self._provider.name

    @property
    def capabilities(self) -> Capabilities:
        """The provider's capabilities, stated up front by every provider that knows them
        without I/O (memory, sql, stripe). One whose backend must say (the HTTP provider's
        service) has them once an operation or `load_capabilities()` asked; before that
        this raises `MeteringError` (a property must not do I/O on an event loop)."""
        known = self._capabilities.known
        if known is None:
            raise MeteringError(
                f"provider {self.provider_name!r} states its capabilities only when asked: "
                "await load_capabilities() first"
            )
        return known

    async def load_capabilities(self) -> Capabilities:
        """The provider's capabilities, asked of it once (its backend, for some) and kept."""
        return await self._capabilities.get()

    async def _require(self, operation: Operation) -> None:
        guards.require_operation(await self.load_capabilities(), self.provider_name, operation)

    async def create_meter(
        self, meter: MeterCreate | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> Meter:
        """Create a meter for one event name."""
        request = _coerce(MeterCreate, meter, fields)
        guards.check_meter_create(await self.load_capabilities(), self.provider_name, request)
        return await self._provider.create_meter(request)

    async def fetch_meter(self, meter_id: str) -> Meter:
        guards.check_name("meter_id", meter_id)
        await self._require(Operation.FETCH_METER)
        return await self._provider.fetch_meter(meter_id)

    async def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        """One page of meters; pass `next_cursor` back for the next."""
        await self._require(Operation.FETCH_ALL_METERS)
        return await self._provider.fetch_all_meters(limit=limit, cursor=cursor)

    async def iter_meters(self, *, page_size: int = 100) -> AsyncIterator[Meter]:
        """Every meter, following cursors page by page."""
        cursor: str | None = None
        while True:
            page = await self.fetch_all_meters(limit=page_size, cursor=cursor)
            for meter in page.items:
                yield meter
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def update_meter(
        self, meter_id: str, update: MeterUpdate | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> Meter:
        guards.check_name("meter_id", meter_id)
        request = _coerce(MeterUpdate, update, fields)
        guards.check_meter_update(await self.load_capabilities(), self.provider_name, request)
        return await self._provider.update_meter(meter_id, request)

    async def delete_meter(self, meter_id: str) -> None:
        guards.check_name("meter_id", meter_id)
        await self._require(Operation.DELETE_METER)
        await self._provider.delete_meter(meter_id)

    async def start(self) -> None:
        """Start background delivery in the running loop (otherwise done on first use):
        the queue's, and for a ledger with mirrors its forwarder (`mirror_forwarder`)."""
        await self._pipeline.start()

    def _queue_from_thread(self, events: Iterable[EventInput], timeout: float | None) -> list[str]:
        """Validate and queue from a thread other than the loop's (the sync facade's)."""
        checked = self._checked_events(events)
        self._pipeline.submit_threadsafe(checked, timeout=timeout)
        return [event.id for event in checked]

    def _checked_events(self, events: Iterable[EventInput]) -> list[UsageEvent]:
        """Validated events. Ingestion is an operation every provider has, so nothing is
        asked of the provider here: with a spool, ingesting never needs it reachable."""
        return _coerce_events(events)

    async def ingest_usage_event(
        self, event: EventInput | None = None, /, *, timeout: float | None = None, **fields: Any
    ) -> str:
        """Queue one event for delivery and return its id (the idempotency key).

        With `spool_path` set, it returns only once the event is committed to the spool.
        """
        checked = self._checked_events([_coerce(UsageEvent, event, fields)])
        await self._pipeline.submit(checked, timeout=timeout)
        return checked[0].id

    async def ingest_usage_events(
        self, events: Iterable[EventInput], *, timeout: float | None = None
    ) -> list[str]:
        """Queue events for delivery and return their ids in order; all are validated first."""
        checked = self._checked_events(events)
        await self._pipeline.submit(checked, timeout=timeout)
        return [event.id for event in checked]

    async def deliver_usage_events(
        self, events: Iterable[EventInput], *, lowering_refused: bool = False
    ) -> IngestResult:
        """Deliver now, without the queue, and answer per event: for gateways (the REST
        service) whose caller keeps its own queue and retries; counted, logged and given
        to the `usage_delivered` hook as the queue's deliveries are. `lowering_refused` (where
        the provider's capabilities say `refuses_lowering`): events of meters whose usage
        an event can lower are rejected, judged by the meters as the provider stores them."""
        checked = self._checked_events(events)
        began = time.monotonic()
        if lowering_refused:
            result = await self._provider.ingest_usage_events(checked, lowering_refused=True)
        else:
            result = await self._provider.ingest_usage_events(checked)
        self._pipeline.record_direct(len(checked), result, time.monotonic() - began)
        return result

    async def handle_event(self, event: Mapping[str, Any]) -> Any:
        """Route an event-bus message (EventBridge or CloudEvent) to ingestion, onboarding or
        offboarding; returns the ids ingested, the customer created, or None."""
        return await events_module.route(events_module.parse_event(event), self)

    def dead_letters(self) -> list[DeadLetter]:
        """Events rejected for good, kept in the spool with their reasons (needs `spool_path`)."""
        return self._pipeline.spool.dead_letters() if self._pipeline.spool is not None else []

    def retry_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        """Queue dead letters (all, or these ids) for another delivery; returns their ids."""
        return self._pipeline.retry_dead_letters(ids)

    def stats(self) -> PipelineStats:
        """What ingestion has done so far: queued, accepted, duplicates, rejected, retried,
        dead-lettered, and the queue's depth (also reported through OpenTelemetry)."""
        return self._pipeline.stats

    async def flush(self, timeout: float | None = None) -> IngestResult:
        """Wait until every queued event reached the provider; report all since the last flush."""
        return await self._pipeline.flush(timeout)

    async def fetch_usage(
        self,
        meter_id: str | UsageQuery,
        *,
        customer_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        window: Window | str | None = None,
        group_by: Sequence[str] = (),
        tz: str = "UTC",
        filters: Mapping[str, Sequence[str]] | None = None,
        customer_ids: Sequence[str] = (),
    ) -> Usage:
        """Aggregated usage of one meter over [start, end), by window and group; only the
        events whose dimensions pass `filters` (`{"region": ["eu", "us"]}`: values OR-ed
        within a key, keys AND-ed) and, with `customer_ids`, only those customers'."""
        if isinstance(meter_id, UsageQuery):
            query = meter_id
        else:
            query = UsageQuery(
                meter_id=meter_id,
                customer_id=customer_id,
                start=start,
                end=end,
                window=window,
                group_by=tuple(group_by),
                tz=tz,
                filters=_filters(filters),
                customer_ids=_listed("customer_ids", customer_ids),
            )
        guards.check_usage_query(await self.load_capabilities(), self.provider_name, query)
        return await self._provider.fetch_usage(query)

    async def list_usage_events(
        self,
        meter_id: str | EventQuery | None = None,
        *,
        event_name: str | None = None,
        customer_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        filters: Mapping[str, Sequence[str]] | None = None,
        customer_ids: Sequence[str] = (),
        include_cancelled: bool = False,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[StoredEvent]:
        """One page of the events stored for a meter (named by `meter_id` or `event_name`)
        with timestamps in [start, end), oldest first; pass `next_cursor` back for the
        next. The events behind a usage number, for a dispute or an audit."""
        if isinstance(meter_id, EventQuery):
            query = meter_id
        else:
            query = EventQuery(
                meter_id=meter_id,
                event_name=event_name,
                customer_id=customer_id,
                start=start,
                end=end,
                filters=_filters(filters),
                customer_ids=_listed("customer_ids", customer_ids),
                include_cancelled=include_cancelled,
                limit=limit,
                cursor=cursor,
            )
        guards.check_event_query(await self.load_capabilities(), self.provider_name, query)
        page = await self._provider.list_usage_events(query)
        guards.check_event_page(self.provider_name, query, page)
        return page

    async def iter_usage_events(
        self,
        meter_id: str | None = None,
        *,
        event_name: str | None = None,
        customer_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        filters: Mapping[str, Sequence[str]] | None = None,
        customer_ids: Sequence[str] = (),
        include_cancelled: bool = False,
        page_size: int = 1000,
    ) -> AsyncIterator[StoredEvent]:
        """Every stored event `list_usage_events` would page through, one page held at a
        time (an export of any size in constant memory)."""
        query = EventQuery(
            meter_id=meter_id,
            event_name=event_name,
            customer_id=customer_id,
            start=start,
            end=end,
            filters=_filters(filters),
            customer_ids=_listed("customer_ids", customer_ids),
            include_cancelled=include_cancelled,
            limit=page_size,
        )
        while True:
            page = await self.list_usage_events(query)
            for event in page.items:
                yield event
            if page.next_cursor is None:
                return
            query = query.model_copy(update={"cursor": page.next_cursor})

    async def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        """Cancel events by id; the result says what became of each id. What this facade
        still queues is delivered first: an event ingested just before is cancelled, not
        reported not found and then delivered and counted."""
        await self._require(Operation.CANCEL_USAGE_EVENTS)
        if isinstance(event_ids, str):
            raise ValidationError(
                f"event_ids must be a list of ids, not one string ({event_ids!r})",
                field="event_ids",
                value=event_ids,
            )
        unique_ids = list(dict.fromkeys(event_ids))  # one verdict per id, even if repeated
        for index, event_id in enumerate(unique_ids):
            guards.check_name(f"event_ids[{index}]", event_id)
        if event_name is not None:
            guards.check_name("event_name", event_name)
        await self._pipeline.settle()
        return await self._provider.cancel_usage_events(unique_ids, event_name=event_name)

    async def create_customer(
        self, customer: CustomerCreate | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> Customer:
        """Register a tenant with the provider; its id is the tenant id."""
        request = _coerce(CustomerCreate, customer, fields)
        await self._require(Operation.CREATE_CUSTOMER)
        return await self._provider.create_customer(request)

    async def delete_customer(self, customer_id: str) -> None:
        guards.check_name("customer_id", customer_id)
        await self._require(Operation.DELETE_CUSTOMER)
        await self._provider.delete_customer(customer_id)

    def _ledger(self) -> Ledger:
        if not isinstance(self._provider, Ledger) or not self._provider.mirrored:
            raise ConfigurationError(
                f"provider {self.provider_name!r} feeds no mirrors: give the sql provider "
                "`mirrors` (METERING_SQL_MIRRORS, or [tool.metering.sql.mirrors.<name>])"
            )
        return self._provider

    async def mirror_status(self) -> list[MirrorStatus]:
        """What each mirror of the ledger is still owed: outbox depth, the age of its
        oldest row, and dead letters (rows the mirror refused, with its reason)."""
        return await self._ledger().mirror_status()

    async def flush_mirrors(self, timeout: float | None = None) -> list[MirrorStatus]:
        """Deliver what is queued to the ledger, then forward until every mirror has
        every event and cancellation owed to it (or refused it); the statuses then.
        `TimeoutError` after `timeout` seconds (a mirror down: nothing is lost, the
        outbox keeps it)."""
        ledger = self._ledger()
        began = time.monotonic()
        await self._pipeline.settle(timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
        return await ledger.flush_mirrors(left)

    async def reconcile(
        self,
        mirror: str,
        *,
        start: datetime,
        end: datetime,
        window: Window | str = Window.DAY,
        meter_ids: Sequence[str] | None = None,
        repair: bool = False,
    ) -> ReconcileReport:
        """Prove `mirror` holds what the ledger holds: each meter's usage per customer
        and window on both sides, compared exactly. `ok` when no cell is short or over;
        cells the ledger still owes the mirror are `pending`, and those the mirror cannot
        answer `not_comparable`. `repair` sends each short cell of a sum or count meter
        its difference (ids derived from the cell: repairing twice sends nothing twice);
        the report is the one before the repair, its repaired cells marked."""
        ledger = self._ledger()
        await self._pipeline.settle()  # what was ingested here is in the ledger first
        checked = UsageQuery(meter_id="reconcile", start=start, end=end, window=window)
        return await ledger.reconcile(
            mirror,
            start=checked.start,
            end=checked.end,
            window=checked.window or Window.DAY,
            meter_ids=None if meter_ids is None else _listed("meter_ids", meter_ids),
            repair=repair,
        )

    async def link_mirror(self, mirror: str) -> list[MirrorLink]:
        """Bring every meter and customer the ledger holds to `mirror` (for a mirror added
        after them): each meter found there by its event name and linked, or created;
        each customer created. A meter the mirror cannot bill is reported `refused`."""
        return await self._ledger().link_mirror(mirror)

    async def backfill_mirror(
        self,
        mirror: str,
        *,
        start: datetime,
        end: datetime | None = None,
        mirror_added: datetime | None = None,
    ) -> int:
        """Owe `mirror` every live event of the ledger from `start` to `end` (default
        now), for a mirror added after they were stored; the number owed. The forwarder
        sends them; `flush_mirrors` waits for it. `mirror_added`: when the mirror was
        first configured on this store, where the store does not know (it forwarded
        before it noted that) and the mirror forgets event ids."""
        checked = UsageQuery(meter_id="backfill", start=start, end=end or datetime.now(UTC))
        added = None
        if mirror_added is not None:
            added = Backfill(mirror_added=mirror_added).mirror_added
        return await self._ledger().backfill_mirror(
            mirror, start=checked.start, end=checked.end, mirror_added=added
        )

    async def receive_mirror_notice(
        self, source: str, body: bytes, headers: Mapping[str, str]
    ) -> int:
        """Record a refusal notice (a webhook) from the ledger's mirror of provider
        `source`: its sampled events become that mirror's dead letters, so reconcile
        marks their cells `refused`; the number recorded (0: a replay, or another kind of
        notice). `ValidationError` when its signature does not verify."""
        lowered = {name.lower(): value for name, value in headers.items()}
        return await self._ledger().receive_notice(source, body, lowered)

    async def retry_mirror_dead_letters(self, mirror: str) -> int:
        """Owe `mirror` again what it refused, once the cause is fixed; the rows requeued."""
        return await self._ledger().retry_mirror_dead_letters(mirror)

    async def forward_mirrors(self) -> None:
        """Forward what the mirrors are owed until cancelled (`metering mirror run` runs
        one alone; a Metering runs one alongside its delivery unless `mirror_forwarder`
        is false). Several may share one PostgreSQL."""
        await self._ledger().forward_mirrors()

    async def close(self) -> IngestResult:
        """Deliver what is queued, release the provider, and report the last deliveries."""
        if self._closed:
            return IngestResult()
        self._closed = True
        try:
            return await self._pipeline.aclose()
        finally:
            await self._provider.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncMetering provider={self.provider_name!r}>"


def _mirror(
    method: Callable[Concatenate[AsyncMetering, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Metering, P], R]:
    """The synchronous twin of an `AsyncMetering` method: same name, signature and doc,
    run on the process-wide loop thread."""

    def run(self: Metering, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return shared_loop().run(method(self._async, *args, **kwargs))

    return _named_like(run, method)


def _mirror_iterator(
    method: Callable[Concatenate[AsyncMetering, P], AsyncIterator[R]],
) -> Callable[Concatenate[Metering, P], Iterator[R]]:
    """The synchronous twin of an async generator method: each item fetched on the loop."""

    def run(self: Metering, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        items = method(self._async, *args, **kwargs)

        async def step() -> R:
            return await anext(items)

        loop = shared_loop()
        while True:
            try:
                yield loop.run(step())
            except StopAsyncIteration:
                return

    return _named_like(run, method)


def _delegate(
    method: Callable[Concatenate[AsyncMetering, P], R],
) -> Callable[Concatenate[Metering, P], R]:
    """A method that needs no loop (it touches only the spool), called through as it is."""

    def run(self: Metering, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return method(self._async, *args, **kwargs)

    return _named_like(run, method)


def _named_like(function: F, method: Callable[..., Any]) -> F:
    for attribute in ("__name__", "__qualname__", "__doc__"):
        setattr(function, attribute, getattr(method, attribute))
    function.__wrapped__ = method  # type: ignore[attr-defined]  # inspect.signature follows it
    return function


class Metering:
    """The synchronous twin of `AsyncMetering`: same methods, same arguments, not awaited.

    Every operation runs on one event loop in a daemon thread shared by the whole process;
    ingestion validates and queues in the caller's thread, with no round trip per event.
    """

    def __init__(
        self,
        provider: str | IMetering | None = None,
        *,
        config_file: Path | str | None = None,
        **options: Any,
    ) -> None:
        self._async = AsyncMetering(provider, config_file=config_file, **options)
        shared_loop().run(self._async.start())

    @property
    def provider(self) -> IMetering:
        return self._async.provider

    @property
    def provider_name(self) -> str:
        return self._async.provider_name

    @property
    def capabilities(self) -> Capabilities:
        """The provider's capabilities (asked of it once, and kept)."""
        return self.load_capabilities()

    @property
    def settings(self) -> MeteringSettings:
        return self._async.settings

    load_capabilities = _mirror(AsyncMetering.load_capabilities)
    create_meter = _mirror(AsyncMetering.create_meter)
    fetch_meter = _mirror(AsyncMetering.fetch_meter)
    fetch_all_meters = _mirror(AsyncMetering.fetch_all_meters)
    iter_meters = _mirror_iterator(AsyncMetering.iter_meters)
    update_meter = _mirror(AsyncMetering.update_meter)
    delete_meter = _mirror(AsyncMetering.delete_meter)
    deliver_usage_events = _mirror(AsyncMetering.deliver_usage_events)
    handle_event = _mirror(AsyncMetering.handle_event)
    flush = _mirror(AsyncMetering.flush)
    fetch_usage = _mirror(AsyncMetering.fetch_usage)
    list_usage_events = _mirror(AsyncMetering.list_usage_events)
    iter_usage_events = _mirror_iterator(AsyncMetering.iter_usage_events)
    cancel_usage_events = _mirror(AsyncMetering.cancel_usage_events)
    create_customer = _mirror(AsyncMetering.create_customer)
    delete_customer = _mirror(AsyncMetering.delete_customer)
    close = _mirror(AsyncMetering.close)
    mirror_status = _mirror(AsyncMetering.mirror_status)
    flush_mirrors = _mirror(AsyncMetering.flush_mirrors)
    forward_mirrors = _mirror(AsyncMetering.forward_mirrors)
    reconcile = _mirror(AsyncMetering.reconcile)
    link_mirror = _mirror(AsyncMetering.link_mirror)
    backfill_mirror = _mirror(AsyncMetering.backfill_mirror)
    retry_mirror_dead_letters = _mirror(AsyncMetering.retry_mirror_dead_letters)
    receive_mirror_notice = _mirror(AsyncMetering.receive_mirror_notice)

    def ingest_usage_event(
        self, event: EventInput | None = None, /, *, timeout: float | None = None, **fields: Any
    ) -> str:
        """Queue one event for delivery and return its id (the idempotency key).

        With `spool_path` set, it returns only once the event is committed to the spool.
        """
        return self._async._queue_from_thread([_coerce(UsageEvent, event, fields)], timeout)[0]

    def ingest_usage_events(
        self, events: Iterable[EventInput], *, timeout: float | None = None
    ) -> list[str]:
        """Queue events for delivery and return their ids in order; all are validated first."""
        return self._async._queue_from_thread(events, timeout)

    dead_letters = _delegate(AsyncMetering.dead_letters)
    stats = _delegate(AsyncMetering.stats)
    retry_dead_letters = _delegate(AsyncMetering.retry_dead_letters)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Metering provider={self.provider_name!r}>"
