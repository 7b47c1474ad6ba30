"""The in-memory provider: complete, exact, nothing persisted (the default is `sql`).

Nothing is persisted: it serves development, tests, demos, and a single-process metering
service. Events are indexed by meter and customer in time-sorted columns, so a usage query
reads only the events of its range. Semantics every provider is measured against:

- one meter per event name (`ConflictError`); deleting a meter drops its events, and later
  events for its event name are rejected;
- an id seen before, cancelled or not, is a duplicate: the first occurrence wins;
- an event for an event name without a meter, or a unique_count event without the counted
  dimension, is rejected with the reason;
- cancelling removes an event from usage; cancelling it again is rejected ("already
  cancelled");
- `latest` takes the event with the greatest timestamp; a tie goes to the greatest id,
  whichever customer it belongs to (`rules.Bucket.add_latest`);
- creating a customer again with the same fields returns it; with other fields, `ConflictError`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import secrets
import threading
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Concatenate, ParamSpec, TypeVar

from pydantic import Field

from metering_core import rules
from metering_core.config import ProviderSettings
from metering_core.cursors import (
    check_limit,
    decode_cursor,
    decode_event_cursor,
    encode_cursor,
    encode_event_cursor,
)
from metering_core.epoch import epoch_micros, from_epoch_micros
from metering_core.errors import ConflictError, NotFoundError
from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_core.interface import BaseProvider, Capabilities, Operation
from metering_core.memory.store import DimensionSets, GroupOf, Series
from metering_core.models import (
    MAX_ROWS,
    Aggregation,
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
    UsageRow,
    Window,
    too_many_rows,
)

__all__ = ["MemoryProvider", "MemorySettings"]

CAPABILITIES = Capabilities(
    operations=frozenset(Operation),
    windows=frozenset(Window),
    filters=True,
    max_batch_size=10_000,
    refuses_lowering=True,
)
P = ParamSpec("P")
R = TypeVar("R")
_SHARED_VALUES = {Decimal(i): Decimal(i) for i in range(-100, 1001)}
"""Common whole values share one object: a million events of value 1 hold one Decimal."""


class MemorySettings(ProviderSettings):
    """Options of the memory provider."""

    max_batch_size: int = Field(default=10_000, ge=1)


class _StoredMeter:
    __slots__ = ("meter", "sequence", "series")

    def __init__(self, meter: Meter, sequence: int) -> None:
        self.meter = meter
        self.sequence = sequence
        self.series: dict[str, Series] = {}


def _off_loop(
    method: Callable[Concatenate[MemoryProvider, P], R],
) -> Callable[Concatenate[MemoryProvider, P], Coroutine[Any, Any, R]]:
    """Run an operation without the event loop ever waiting on the provider's lock (which
    a long usage query may hold): at once when the lock is free, as it nearly always is
    (a thread hop costs more than the work), else in a worker thread."""

    async def run(self: MemoryProvider, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._lock.acquire(blocking=False):
            try:
                return method(self, *args, **kwargs)
            finally:
                self._lock.release()
        return await asyncio.to_thread(method, self, *args, **kwargs)

    run.__name__, run.__qualname__, run.__doc__ = (
        method.__name__,
        method.__qualname__,
        method.__doc__,
    )
    return run


class MemoryProvider(BaseProvider):
    """Every operation, every aggregation and window, group-by, exact Decimal values."""

    name = "memory"

    def __init__(self, settings: MemorySettings | None = None) -> None:
        settings = settings or MemorySettings()
        self._capabilities = CAPABILITIES.model_copy(
            update={"max_batch_size": settings.max_batch_size}
        )
        self._lock = threading.RLock()  # held by _off_loop, then taken again inside
        self._meters: dict[str, _StoredMeter] = {}
        self._by_event_name: dict[str, _StoredMeter] = {}
        # every id ever stored -> its series' place in `_series`: a dict of strings and
        # ints, which the garbage collector does not track (a dict holding the Series
        # themselves would be walked entry by entry by every full collection)
        self._seen: dict[str, int] = {}
        self._series: list[Series] = []
        self._dimension_sets = DimensionSets()
        self._customers: dict[str, Customer] = {}
        self._sequence = itertools.count()

    def known_capabilities(self) -> Capabilities:
        return self._capabilities

    # meters

    @_off_loop
    def create_meter(self, meter: MeterCreate) -> Meter:
        now = datetime.now(UTC)
        fields = meter.model_dump(exclude={"display_name"})
        created = Meter(
            **fields,
            id=f"mtr_{secrets.token_hex(12)}",
            display_name=meter.display_name or meter.event_name,
            created_at=now,
            updated_at=now,
        )
        with self._lock:
            existing = self._by_event_name.get(meter.event_name)
            if existing is not None:
                raise ConflictError(
                    f"a meter for event_name={meter.event_name!r} exists already: "
                    f"{existing.meter.id}"
                )
            stored = _StoredMeter(created, next(self._sequence))
            self._meters[created.id] = stored
            self._by_event_name[created.event_name] = stored
        return created

    def _stored(self, meter_id: str) -> _StoredMeter:
        stored = self._meters.get(meter_id)
        if stored is None:
            raise NotFoundError(f"no meter with id {meter_id!r}")
        return stored

    @_off_loop
    def fetch_meter(self, meter_id: str) -> Meter:
        with self._lock:
            return self._stored(meter_id).meter

    @_off_loop
    def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        check_limit(limit)
        after = decode_cursor(cursor)
        with self._lock:
            later = [stored for stored in self._meters.values() if stored.sequence > after]
        page = later[:limit]
        more = len(later) > limit
        return Page[Meter](
            items=[stored.meter for stored in page],
            next_cursor=encode_cursor(page[-1].sequence) if more else None,
        )

    @_off_loop
    def update_meter(self, meter_id: str, update: MeterUpdate) -> Meter:
        changes = {name: getattr(update, name) for name in update.model_fields_set}
        with self._lock:
            stored = self._stored(meter_id)
            stored.meter = stored.meter.model_copy(
                update={**changes, "updated_at": datetime.now(UTC)}
            )
            return stored.meter

    @_off_loop
    def delete_meter(self, meter_id: str) -> None:
        with self._lock:
            stored = self._stored(meter_id)
            del self._meters[meter_id]
            del self._by_event_name[stored.meter.event_name]

    # usage

    @_off_loop
    def ingest_batch(self, events: Sequence[UsageEvent]) -> IngestResult:
        return self._store_events(events, lowering_refused=False)

    @_off_loop
    def ingest_batch_raising_only(self, events: Sequence[UsageEvent]) -> IngestResult:
        return self._store_events(events, lowering_refused=True)

    def _store_events(
        self, events: Sequence[UsageEvent], *, lowering_refused: bool
    ) -> IngestResult:
        with self._lock:
            seen, number = self._seen, self._dimension_sets.number
            known_before = {event.id for event in events if event.id in seen}
            refusals = [
                rules.refusal(
                    self._meter_named(event.event_name), event, lowering_refused=lowering_refused
                )
                for event in events
            ]
            now = epoch_micros(datetime.now(UTC))
            for event, reason in zip(events, refusals, strict=True):
                if reason is not None or event.id in seen:
                    continue
                stored = self._by_event_name[event.event_name]
                series = stored.series.get(event.customer_id)
                if series is None:
                    series = stored.series[event.customer_id] = Series(
                        event.customer_id, event.event_name, len(self._series)
                    )
                    self._series.append(series)
                series.append(
                    event.id,
                    epoch_micros(event.timestamp),
                    _SHARED_VALUES.get(event.value, event.value),
                    number(event.dimensions),
                    now,
                )
                seen[event.id] = series.number
            # every id stored, this batch's among them: what `known_before` lacks went in now
            return rules.ingest_verdicts(events, refusals, seen, known_before)

    def _meter_named(self, event_name: str) -> Meter | None:
        stored = self._by_event_name.get(event_name)
        return None if stored is None else stored.meter

    async def fetch_usage(self, query: UsageQuery) -> Usage:
        # CPU-bound and bounded (MAX_WINDOWS, MAX_ROWS): run off the event loop, so one
        # large query cannot delay a service's other requests.
        return await asyncio.to_thread(self._usage, query)

    def _usage(self, query: UsageQuery) -> Usage:
        with self._lock:
            stored = self._stored(query.meter_id)
            meter = stored.meter
            plan = rules.plan_query(meter, query)
            series = _series_of(stored, plan.customers)
            rows = _rows(meter, query, plan, series, self._dimension_sets)
        return rules.answer(query, meter.aggregation, rows)

    async def list_usage_events(self, query: EventQuery) -> Page[StoredEvent]:
        return await asyncio.to_thread(self._events, query)

    def _events(self, query: EventQuery) -> Page[StoredEvent]:
        after = decode_event_cursor(query.cursor)
        with self._lock:
            if query.meter_id is not None:
                stored = self._stored(query.meter_id)
            else:
                assert query.event_name is not None
                found = self._by_event_name.get(query.event_name)
                if found is None:
                    raise NotFoundError(f"no meter for event_name={query.event_name!r}")
                stored = found
            filters = rules.check_filters(stored.meter, query.filters)
            start, end = epoch_micros(query.start), epoch_micros(query.end)
            admitted = GroupOf(self._dimension_sets, (), None, filters)
            candidates = heapq.merge(
                *(s.listed(start, end, after) for s in _series_of(stored, _customers(query)))
            )
            page: list[tuple[int, str, StoredEvent]] = []
            for micros, event_id, series, position in candidates:
                value = series.values[position]
                if (value is None and not query.include_cancelled) or admitted[
                    series.dimensions[position]
                ] is None:
                    continue
                page.append((micros, event_id, self._stored_event(series, position, value)))
                if len(page) > query.limit:
                    break
        more = len(page) > query.limit
        last = page[query.limit - 1] if more else None
        return Page[StoredEvent](
            items=[event for *_, event in page[: query.limit]],
            next_cursor=None if last is None else encode_event_cursor(last[0], last[1]),
        )

    def _stored_event(self, series: Series, position: int, value: Decimal | None) -> StoredEvent:
        event_id = series.ids[position]
        return StoredEvent.model_construct(
            id=event_id,
            event_name=series.event_name,
            customer_id=series.customer_id,
            timestamp=from_epoch_micros(series.times[position]),
            value=rules.canonical(series.cancelled_values[event_id] if value is None else value),
            dimensions=dict(self._dimension_sets.pairs[series.dimensions[position]]),
            cancelled=value is None,
            ingested_at=from_epoch_micros(series.ingested[position]),
        )

    @_off_loop
    def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        with self._lock:
            places = {i: self._seen[i] for i in event_ids if i in self._seen}
            names = {i: self._series[place].event_name for i, place in places.items()}
            by_series: dict[int, list[str]] = {}
            for event_id in rules.cancellable(dict.fromkeys(event_ids), names, event_name):
                by_series.setdefault(places[event_id], []).append(event_id)
            cancelled: set[str] = set()
            for place, ids in by_series.items():  # one scan of each series, not one per id
                series = self._series[place]
                positions = series.positions(set(ids))
                cancelled.update(i for i in ids if series.cancel(positions[i]))
        return rules.cancel_verdicts(event_ids, names, cancelled, event_name)

    # customers

    @_off_loop
    def create_customer(self, customer: CustomerCreate) -> Customer:
        created = Customer(**customer.model_dump())
        with self._lock:
            existing = self._customers.get(customer.id)
            if existing is None:
                self._customers[customer.id] = created
                return created
        if existing == created:
            return existing
        raise ConflictError(f"customer {customer.id!r} exists already with other fields")

    @_off_loop
    def delete_customer(self, customer_id: str) -> None:
        with self._lock:
            if self._customers.pop(customer_id, None) is None:
                raise NotFoundError(f"no customer with id {customer_id!r}")


def _customers(query: EventQuery) -> frozenset[str] | None:
    return rules.admitted_customers(query.customer_id, query.customer_ids)


def _series_of(stored: _StoredMeter, customers: frozenset[str] | None) -> list[Series]:
    """The series of a meter's customers (all, when None)."""
    if customers is None:
        return list(stored.series.values())
    return [stored.series[c] for c in sorted(customers) if c in stored.series]


def _rows(
    meter: Meter,
    query: UsageQuery,
    plan: rules.QueryPlan,
    series_list: list[Series],
    dimension_sets: DimensionSets,
) -> list[UsageRow]:
    """Fold the events of each (window, group) into one row; only combinations with events."""
    micros = plan.micros
    per_event = bool(plan.keys or plan.filters) or meter.aggregation in rules.PER_EVENT
    buckets: dict[tuple[int, str | None, tuple[str, ...]], rules.Bucket] = {}
    group_of = GroupOf(dimension_sets, plan.keys, meter.unique_dimension, plan.filters)
    for series in series_list:
        customer = series.customer_id if plan.by_customer else None
        for window in range(plan.windows):
            span = series.span(micros[window], micros[window + 1])
            if not span:
                continue
            if per_event:
                _fill_per_event(query, meter, series, span, window, customer, group_of, buckets)
                continue
            values = [v for v in series.values.between(span.start, span.stop) if v is not None]
            if values:
                buckets.setdefault((window, customer, ()), rules.Bucket()).values.extend(values)
        if len(buckets) > MAX_ROWS:
            raise too_many_rows(query)
    fold = rules.FOLDS[meter.aggregation]
    return rules.ordered_rows(
        (
            (window, customer, group, plan.row(window, customer, group, fold(bucket)))
            for (window, customer, group), bucket in buckets.items()
        ),
    )


def _fill_per_event(
    query: UsageQuery,
    meter: Meter,
    series: Series,
    span: range,
    window: int,
    customer: str | None,
    group_of: GroupOf,
    buckets: dict[tuple[int, str | None, tuple[str, ...]], rules.Bucket],
) -> None:
    """Bucket events one by one: for grouping by or filtering on dimensions, latest, and
    unique_count."""
    values = series.values.between(span.start, span.stop)
    for position, value in zip(span, values, strict=True):
        if value is None:
            continue
        grouped = group_of[series.dimensions[position]]
        if grouped is None:  # left out by the query's filters
            continue
        group, counted = grouped
        bucket = buckets.get((window, customer, group))
        if bucket is None:
            if len(buckets) >= MAX_ROWS:
                raise too_many_rows(query)
            bucket = buckets[(window, customer, group)] = rules.Bucket()
        bucket.values.append(value)
        if meter.aggregation is Aggregation.LATEST:
            bucket.add_latest(series.times[position], series.ids[position], value)
        elif counted is not None:
            bucket.distinct.add(counted)


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    """The memory provider registers through the same hook as every other provider."""
    register("memory", MemoryProvider, MemorySettings, capabilities=CAPABILITIES)
