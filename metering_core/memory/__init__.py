"""The in-memory provider: complete, exact, the embedded default.

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
- `latest` takes the event with the greatest timestamp; a tie goes to the one ingested last,
  whichever customer it belongs to;
- creating a customer again with the same fields returns it; with other fields, `ConflictError`.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Concatenate, ParamSpec, TypeVar

from pydantic import Field

from metering_core.config import ProviderSettings
from metering_core.cursors import check_limit, decode_cursor, encode_cursor
from metering_core.errors import ConflictError, NotFoundError, ValidationError
from metering_core.hookspecs import RegisterProvider, hookimpl
from metering_core.interface import BaseProvider, Capabilities
from metering_core.memory.aggregate import Bucket, fold
from metering_core.memory.store import DimensionSets, GroupOf, Series, epoch_micros
from metering_core.models import (
    MAX_ROWS,
    Aggregation,
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
    UsageRow,
    too_many_rows,
)
from metering_core.windows import window_bounds

__all__ = ["MemoryProvider", "MemorySettings"]

CAPABILITIES = Capabilities(max_batch_size=10_000)
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
        self._ingested = itertools.count()

    @property
    def capabilities(self) -> Capabilities:
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
        accepted: list[str] = []
        duplicates: list[str] = []
        rejected: dict[str, str] = {}
        with self._lock:
            seen, number = self._seen, self._dimension_sets.number
            for event in events:
                event_id = event.id
                if event_id in seen:
                    duplicates.append(event_id)
                    continue
                stored = self._by_event_name.get(event.event_name)
                reason = _refusal(stored, event)
                if reason is not None:
                    rejected[event_id] = reason
                    continue
                assert stored is not None
                series = stored.series.get(event.customer_id)
                if series is None:
                    series = stored.series[event.customer_id] = Series(
                        event.customer_id, event.event_name, len(self._series)
                    )
                    self._series.append(series)
                series.append(
                    event_id,
                    epoch_micros(event.timestamp),
                    _SHARED_VALUES.get(event.value, event.value),
                    number(event.dimensions),
                    next(self._ingested),
                )
                seen[event_id] = series.number
                accepted.append(event_id)
        return IngestResult(accepted=accepted, duplicates=duplicates, rejected=rejected)

    async def fetch_usage(self, query: UsageQuery) -> Usage:
        # CPU-bound and bounded (MAX_WINDOWS, MAX_ROWS): run off the event loop, so one
        # large query cannot delay a service's other requests.
        return await asyncio.to_thread(self._usage, query)

    def _usage(self, query: UsageQuery) -> Usage:
        with self._lock:
            stored = self._stored(query.meter_id)
            meter = stored.meter
            unknown = [
                key
                for key in query.group_by
                if key != "customer_id" and key not in meter.dimensions
            ]
            if unknown:
                raise ValidationError(
                    f"group_by={list(query.group_by)!r}: {unknown[0]!r} is not a dimension of "
                    f"meter {meter.id} (dimensions: {meter.dimensions!r}, or 'customer_id')",
                    field="group_by",
                    value=unknown[0],
                )
            if query.customer_id is None:
                series = list(stored.series.values())
            else:
                series = [s for s in (stored.series.get(query.customer_id),) if s is not None]
            rows = _rows(meter, query, series, self._dimension_sets)
        return Usage.model_construct(
            meter_id=meter.id,
            aggregation=meter.aggregation,
            start=query.start,
            end=query.end,
            window=query.window,
            rows=rows,
        )

    @_off_loop
    def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        result = CancelResult()
        wanted = set(event_ids)
        found: dict[Series, dict[str, int]] = {}
        with self._lock:
            for event_id in event_ids:
                place = self._seen.get(event_id)
                if place is None:
                    result.not_found.append(event_id)
                    continue
                series = self._series[place]
                if event_name is not None and event_name != series.event_name:
                    result.rejected[event_id] = (
                        f"event {event_id!r} has event_name={series.event_name!r}, "
                        f"not {event_name!r}"
                    )
                else:
                    if series not in found:
                        found[series] = series.positions(wanted)
                    if series.cancel(found[series][event_id]):
                        result.cancelled.append(event_id)
                    else:
                        result.rejected[event_id] = f"event {event_id!r} is already cancelled"
        return result

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


def _refusal(stored: _StoredMeter | None, event: UsageEvent) -> str | None:
    """Why an event cannot be stored, or None."""
    if stored is None:
        return f"no meter for event_name={event.event_name!r}"
    counted = stored.meter.unique_dimension
    if counted is not None and counted not in event.dimensions:
        return f"unique_count meter {stored.meter.id} needs dimension {counted!r} on every event"
    return None


def _rows(
    meter: Meter, query: UsageQuery, series_list: list[Series], dimension_sets: DimensionSets
) -> list[UsageRow]:
    """Fold the events of each (window, group) into one row; only combinations with events."""
    bounds = window_bounds(query)
    micros = [epoch_micros(bound) for bound in bounds]
    by_customer = "customer_id" in query.group_by
    dimension_keys = [key for key in query.group_by if key != "customer_id"]
    per_event = bool(dimension_keys) or meter.aggregation in (
        Aggregation.LATEST,
        Aggregation.UNIQUE_COUNT,
    )
    buckets: dict[tuple[int, str | None, tuple[str, ...]], Bucket] = {}
    group_of = GroupOf(dimension_sets, dimension_keys, meter.unique_dimension)
    for series in series_list:
        customer = series.customer_id if by_customer or query.customer_id else None
        for window in range(len(bounds) - 1):
            span = series.span(micros[window], micros[window + 1])
            if not span:
                continue
            if per_event:
                _fill_per_event(
                    query,
                    meter,
                    series,
                    span,
                    window,
                    customer,
                    group_of,
                    buckets,
                )
                continue
            values = [v for v in series.values.between(span.start, span.stop) if v is not None]
            if values:
                buckets.setdefault((window, customer, ()), Bucket()).values.extend(values)
        if len(buckets) > MAX_ROWS:
            raise too_many_rows(query)
    # Rows are built from values this provider validated on the way in: no second validation.
    return [
        UsageRow.model_construct(
            start=bounds[window],
            end=bounds[window + 1],
            customer_id=customer,
            dimensions=dict(zip(dimension_keys, group, strict=True)),
            value=fold(meter.aggregation, bucket),
        )
        for (window, customer, group), bucket in sorted(
            buckets.items(), key=lambda item: (item[0][0], item[0][1] or "", item[0][2])
        )
    ]


def _fill_per_event(
    query: UsageQuery,
    meter: Meter,
    series: Series,
    span: range,
    window: int,
    customer: str | None,
    group_of: GroupOf,
    buckets: dict[tuple[int, str | None, tuple[str, ...]], Bucket],
) -> None:
    """Bucket events one by one: for grouping by dimensions, latest, and unique_count."""
    values = series.values.between(span.start, span.stop)
    for position, value in zip(span, values, strict=True):
        if value is None:
            continue
        group, counted = group_of[series.dimensions[position]]
        bucket = buckets.get((window, customer, group))
        if bucket is None:
            if len(buckets) >= MAX_ROWS:
                raise too_many_rows(query)
            bucket = buckets[(window, customer, group)] = Bucket()
        bucket.values.append(value)
        if meter.aggregation is Aggregation.LATEST:
            bucket.add_latest(series.times[position], series.order[position], value)
        elif counted is not None:
            bucket.distinct.add(counted)


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    """The memory provider registers through the same hook as every other provider."""
    register("memory", MemoryProvider, MemorySettings, capabilities=CAPABILITIES)
