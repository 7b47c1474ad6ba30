"""The billing rules every store follows, stated once.

Which events a batch refuses and why, what each copy of a batch is answered, what a
cancellation answers per id, how a usage query is cut into windows and groups, and how
one window's events fold into one value. The memory and sql providers call these and hold
only storage: a third store, or a new aggregation, writes none of this again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Protocol

from metering_core.epoch import epoch_micros
from metering_core.errors import ValidationError
from metering_core.models import (
    EXACT,
    Aggregation,
    CancelResult,
    IngestResult,
    Meter,
    Usage,
    UsageEvent,
    UsageQuery,
    UsageRow,
)
from metering_core.windows import window_bounds

__all__ = [
    "AVERAGE_PLACES",
    "FOLDS",
    "LOWERED_BY_EVENTS",
    "PER_EVENT",
    "Bucket",
    "EventMeter",
    "QueryPlan",
    "admits",
    "admitted_customers",
    "answer",
    "average",
    "cancel_verdicts",
    "cancellable",
    "cancelled_before",
    "canonical",
    "check_filters",
    "ingest_verdicts",
    "ordered_rows",
    "plan_query",
    "refusal",
]


class EventMeter(Protocol):
    """What the rules need of the meter an event names."""

    @property
    def id(self) -> str: ...

    @property
    def unique_dimension(self) -> str | None: ...

    @property
    def aggregation(self) -> str: ...


# ingestion

LOWERED_BY_EVENTS = frozenset({Aggregation.LATEST, Aggregation.MIN, Aggregation.AVG})
"""Aggregations whose usage an event can lower (a later 0, a smaller value, many zeros):
a caller that may only raise usage (a tenant's own key) may not write to such meters."""


def refusal(
    meter: EventMeter | None, event: UsageEvent, *, lowering_refused: bool = False
) -> str | None:
    """Why an event cannot be stored, or None: no meter for its event name, a unique_count
    meter's counted dimension missing, or (`lowering_refused`: the caller may only raise
    usage) a meter whose usage its events can lower, judged by the meter as stored now."""
    if meter is None:
        return f"no meter for event_name={event.event_name!r}"
    counted = meter.unique_dimension
    if counted is not None and counted not in event.dimensions:
        return f"unique_count meter {meter.id} needs dimension {counted!r} on every event"
    if lowering_refused and meter.aggregation in LOWERED_BY_EVENTS:
        return (
            f"the {meter.aggregation} meter for event_name={event.event_name!r} can be lowered "
            "by its events, and this caller may only raise usage: send them with a key "
            "bound to no tenant"
        )
    return None


def ingest_verdicts(
    batch: Sequence[UsageEvent],
    refusals: Sequence[str | None],
    inserted: Collection[str],
    known_before: Collection[str],
) -> IngestResult:
    """The answer per copy, in batch order. A copy whose id was stored before (by an earlier
    batch, or earlier in this one) is a duplicate, whatever became of its meter: the first
    occurrence wins. Else a refused copy is rejected with its reason, and the copy that went
    in is accepted. A copy neither refused nor inserted lost a race with another writer of
    the same id: a duplicate too."""
    result = IngestResult()
    ids = [event.id for event in batch]
    if (
        not known_before
        and refusals.count(None) == len(ids) == len(refusals)
        and all(map(inserted.__contains__, ids))
        and len(set(ids)) == len(ids)
    ):  # the common batch, every copy new and stored: answered a fifth as dearly
        result.accepted = ids
        return result
    stored: set[str] = set()
    for event, reason in zip(batch, refusals, strict=True):
        if event.id in known_before or event.id in stored:
            result.duplicates.append(event.id)
        elif reason is not None:
            result.rejected[event.id] = reason
        elif event.id in inserted:
            stored.add(event.id)
            result.accepted.append(event.id)
        else:
            result.duplicates.append(event.id)
    return result


# cancellation


def cancellable(
    event_ids: Iterable[str], event_names: Mapping[str, str], event_name: str | None
) -> list[str]:
    """The ids a cancellation may take out of usage: stored (`event_names` maps each stored
    id to its event name), and of the event name asked for, when one was."""
    return [
        event_id
        for event_id in event_ids
        if event_id in event_names and (event_name is None or event_names[event_id] == event_name)
    ]


def cancel_verdicts(
    event_ids: Sequence[str],
    event_names: Mapping[str, str],
    cancelled_now: Collection[str],
    event_name: str | None,
) -> CancelResult:
    """The answer per id: never stored (not found); of another event name than the one
    given (rejected); taken out of usage by this request (cancelled, once: an id named
    again finds it cancelled); or cancelled before (rejected)."""
    result = CancelResult()
    answered: set[str] = set()
    for event_id in event_ids:
        name = event_names.get(event_id)
        if name is None:
            result.not_found.append(event_id)
        elif event_name is not None and name != event_name:
            result.rejected[event_id] = (
                f"event {event_id!r} has event_name={name!r}, not {event_name!r}"
            )
        elif event_id in cancelled_now and event_id not in answered:
            answered.add(event_id)
            result.cancelled.append(event_id)
        else:
            result.rejected[event_id] = f"event {event_id!r}{_CANCELLED_BEFORE}"
    return result


_CANCELLED_BEFORE = " is already cancelled"


def cancelled_before(reason: str) -> bool:
    """Whether a cancel's refusal says the event was cancelled before (by this library's
    providers, and through the REST service): a cancel asked again is then done."""
    return reason.endswith(_CANCELLED_BEFORE)


# usage queries


@dataclass(frozen=True)
class QueryPlan:
    """How a query is cut: its window bounds (as datetimes and as epoch microseconds), the
    dimension keys it groups by, and whether rows are per customer."""

    bounds: list[datetime]
    micros: list[int]
    keys: list[str]
    by_customer: bool
    customers: frozenset[str] | None
    """The customers whose events count; None for every customer."""
    filters: Mapping[str, frozenset[str]]
    """Dimension -> the values it may have, for an event to count."""

    @property
    def windows(self) -> int:
        return len(self.bounds) - 1

    def row(
        self, window: int, customer: str | None, group: Sequence[str], value: Decimal
    ) -> UsageRow:
        """One answer row. Built from values the store validated on the way in, so not
        validated again."""
        return UsageRow.model_construct(
            start=self.bounds[window],
            end=self.bounds[window + 1],
            customer_id=customer if self.by_customer else None,
            dimensions=dict(zip(self.keys, group, strict=True)),
            value=canonical(value),
        )


def plan_query(meter: Meter, query: UsageQuery) -> QueryPlan:
    """The plan of a usage query over `meter`; a group_by key that is neither a dimension of
    the meter nor `customer_id` is refused. Rows are per customer when the query groups by
    customer or names one."""
    keys = [key for key in query.group_by if key != "customer_id"]
    unknown = [key for key in keys if key not in meter.dimensions]
    if unknown:
        raise ValidationError(
            f"group_by={list(query.group_by)!r}: {unknown[0]!r} is not a dimension of "
            f"meter {meter.id} (dimensions: {meter.dimensions!r}, or 'customer_id')",
            field="group_by",
            value=unknown[0],
        )
    bounds = window_bounds(query)
    return QueryPlan(
        bounds=bounds,
        micros=[epoch_micros(bound) for bound in bounds],
        keys=keys,
        by_customer="customer_id" in query.group_by or query.customer_id is not None,
        customers=admitted_customers(query.customer_id, query.customer_ids),
        filters=check_filters(meter, query.filters),
    )


def admitted_customers(
    customer_id: str | None, customer_ids: Sequence[str] = ()
) -> frozenset[str] | None:
    """The customers whose events a query reads: `customer_id`, those of `customer_ids`,
    or those in both when both are given (none, if they share none); None for all."""
    if customer_ids:
        listed = frozenset(customer_ids)
        return listed if customer_id is None else listed & {customer_id}
    return None if customer_id is None else frozenset({customer_id})


def check_filters(meter: Meter, filters: Mapping[str, Sequence[str]]) -> dict[str, frozenset[str]]:
    """Filters as sets of values; a key that is not a dimension of the meter is refused (no
    event could be told apart by it: the filter would silently admit nothing)."""
    known = {*meter.dimensions, *filter(None, [meter.unique_dimension])}
    for key in filters:
        if key not in known:
            raise ValidationError(
                f"filters: {key!r} is not a dimension of meter {meter.id} "
                f"(dimensions: {sorted(known)!r})",
                field="filters",
                value=key,
            )
    return {key: frozenset(values) for key, values in filters.items()}


def admits(filters: Mapping[str, frozenset[str]], dimensions: Mapping[str, str]) -> bool:
    """Whether an event with `dimensions` passes every filter: an absent dimension is `""`
    here as in a group (`group_by` puts both in one row), so that a filter finds the
    events of every row (review: a filter on `""` found only those that said it)."""
    return all(dimensions.get(key, "") in values for key, values in filters.items())


def answer(query: UsageQuery, aggregation: Aggregation, rows: list[UsageRow]) -> Usage:
    """The answer to `query` over its meter (billed by `aggregation`), from rows
    `ordered_rows` gave."""
    return Usage.model_construct(
        meter_id=query.meter_id,
        aggregation=aggregation,
        start=query.start,
        end=query.end,
        window=query.window,
        rows=rows,
    )


def ordered_rows(
    rows: Iterable[tuple[int, str | None, tuple[str, ...], UsageRow]],
) -> list[UsageRow]:
    """Rows in the order every provider gives: window, customer, group. (Each store refuses
    an answer past `MAX_ROWS` as it builds it, so that no more work is done than that.)"""
    return [row for *_, row in sorted(rows, key=lambda item: (item[0], item[1] or "", item[2]))]


# folding one window's events into one value

PER_EVENT = frozenset({Aggregation.LATEST, Aggregation.UNIQUE_COUNT})
"""Aggregations that need each event, not only its value (its time, a dimension)."""

AVERAGE_PLACES = 18
"""Decimal places of an average: those of the values it averages (`FiniteDecimal`)."""


def canonical(value: Decimal) -> Decimal:
    """One form of a number on every store: no trailing zeros, whole numbers without an
    exponent, no -0 (`677.500` and `677.5` are one number; a store's NUMERIC scale is not
    part of it)."""
    with localcontext(EXACT):
        if value == value.to_integral_value():
            return value.quantize(Decimal(1)) + 0  # + 0 turns -0 into 0
        return value.normalize()


def average(total: Decimal, count: int) -> Decimal:
    """`total / count`, rounded half-even to `AVERAGE_PLACES` places: the integer part is
    never rounded (the exact context has room for any sum of 38-digit values), and the
    fraction keeps the places a value may have. An average of 1, 2 and 2 is
    1.666666666666666667 on every store."""
    with localcontext(EXACT) as context:
        context.rounding = ROUND_HALF_EVEN
        return (total / count).quantize(Decimal(1).scaleb(-AVERAGE_PLACES))


@dataclass
class Bucket:
    """The events of one (window, group): their values, and what some folds need."""

    values: list[Decimal] = field(default_factory=list)
    latest: tuple[int, str, Decimal] | None = None
    distinct: set[str] = field(default_factory=set)

    def add_latest(self, micros: int, event_id: str, value: Decimal) -> None:
        """Keep the value with the greatest time; a tie goes to the greatest id (by code
        point, which is UTF-8's byte order). Ids travel with the events, so every copy of
        them (an export loaded elsewhere, a mirror fed out of order, a retried batch)
        breaks the tie alike; the order of arrival is no copy's to keep."""
        if self.latest is None or (micros, event_id) > self.latest[:2]:
            self.latest = (micros, event_id, value)


def _sum(bucket: Bucket) -> Decimal:
    with localcontext(EXACT):
        return sum(bucket.values, Decimal(0))


def _latest(bucket: Bucket) -> Decimal:
    assert bucket.latest is not None
    return bucket.latest[2]


FOLDS: dict[Aggregation, Callable[[Bucket], Decimal]] = {
    # One window's events as one value, by the meter's aggregation.
    Aggregation.SUM: _sum,
    Aggregation.COUNT: lambda bucket: Decimal(len(bucket.values)),
    Aggregation.MIN: lambda bucket: min(bucket.values),
    Aggregation.MAX: lambda bucket: max(bucket.values),
    Aggregation.AVG: lambda bucket: average(_sum(bucket), len(bucket.values)),
    Aggregation.LATEST: _latest,
    Aggregation.UNIQUE_COUNT: lambda bucket: Decimal(len(bucket.distinct)),
}
