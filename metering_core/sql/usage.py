"""Usage queries in SQL: one GROUP BY over the events of the range, windows numbered in
the database, values folded by the database; Python only orders and types the rows."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from metering_core import rules
from metering_core.models import (
    MAX_ROWS,
    Aggregation,
    Meter,
    UsageQuery,
    UsageRow,
    too_many_rows,
)
from metering_core.sql.schema import BUCKET, ROLLED_UP, events, rollups

__all__ = ["dimension", "filtered", "usage_rows", "usage_statement"]


def _window_number(
    dialect: str, bounds: list[int], time: sa.ColumnElement[Any]
) -> sa.ColumnElement[Any]:
    if dialect == "postgresql":
        # width_bucket over the sorted bounds gives 1 for [b0, b1): number from 0
        array = sa.bindparam("bounds", bounds, type_=sa.ARRAY(sa.BigInteger))
        return sa.func.width_bucket(time, array) - 1
    return sa.func.window_index(time, json.dumps(bounds))


def dimension(
    dialect: str, key: str, dimensions: sa.ColumnElement[Any] = events.c.dimensions
) -> sa.ColumnElement[Any]:
    """One dimension's value (NULL when the event lacks it), for any key."""
    if dialect == "postgresql":
        return dimensions.op("->>")(sa.bindparam(None, key, type_=sa.String))
    return sa.func.dimension(dimensions, key)


def _fold(dialect: str, meter: Meter) -> list[sa.ColumnElement[Any]]:
    """The aggregate columns a meter's rows need (avg needs sum and count)."""
    value = events.c.value
    native = dialect == "postgresql"
    total = sa.func.sum(value) if native else sa.func.dec_sum(value)
    match meter.aggregation:
        case Aggregation.SUM:
            return [total]
        case Aggregation.COUNT:
            return [sa.func.count()]
        case Aggregation.AVG:
            return [total, sa.func.count()]
        case Aggregation.MIN:
            return [sa.func.min(value) if native else sa.func.dec_min(value)]
        case Aggregation.MAX:
            return [sa.func.max(value) if native else sa.func.dec_max(value)]
        case Aggregation.LATEST:
            if native:
                # ids by bytes, UTF-8's code point order, as Python compares them
                by_id = events.c.id.collate("C").desc()
                ordered = sa.func.array_agg(
                    postgresql.aggregate_order_by(value, events.c.ts.desc(), by_id)
                )
                return [ordered[1]]
            return [sa.func.latest_value(events.c.ts, events.c.id, value)]
        case Aggregation.UNIQUE_COUNT:
            assert meter.unique_dimension is not None
            counted = dimension(dialect, meter.unique_dimension)
            return [sa.func.count(sa.distinct(counted))]
    raise AssertionError(meter.aggregation)  # pragma: no cover


def _decimal(folded: Any) -> Decimal:
    return folded if isinstance(folded, Decimal) else Decimal(str(folded))


def _value(aggregation: Aggregation, folded: Sequence[Any]) -> Decimal:
    """The database's fold as the rules state it (avg: the rules' average of sum and count)."""
    if aggregation is Aggregation.AVG:
        return rules.average(_decimal(folded[0]), int(folded[1]))
    return _decimal(folded[0])


def usage_statement(
    dialect: str, meter_seq: int, meter: Meter, query: UsageQuery
) -> tuple[sa.Select[Any], rules.QueryPlan]:
    """The statement, and the plan of the query (windows, groups) its rows follow."""
    plan = rules.plan_query(meter, query)
    micros, keys, by_customer = plan.micros, plan.keys, plan.by_customer
    rolled = meter.aggregation in ROLLED_UP and all(b % BUCKET == 0 for b in micros)
    if rolled and not by_customer and plan.customers is None:
        return _from_rollups(dialect, meter_seq, meter, plan), plan
    window = _window_number(dialect, micros, events.c.ts).label("window")
    groups: list[sa.ColumnElement[Any]] = [window]
    if by_customer:
        groups.append(events.c.customer_id)
    groups += [
        sa.func.coalesce(dimension(dialect, key), "").label(f"d{i}") for i, key in enumerate(keys)
    ]
    conditions = [
        events.c.meter_seq == meter_seq,
        events.c.ts >= micros[0],
        events.c.ts < micros[-1],
        events.c.cancelled == sa.false(),
    ]
    if plan.customers is not None:
        conditions.append(events.c.customer_id.in_(sorted(plan.customers)))
    conditions += filtered(dialect, plan.filters, events.c.dimensions)
    statement = (
        sa.select(*groups, *_fold(dialect, meter))
        .where(*conditions)
        .group_by(*groups)
        .limit(MAX_ROWS + 1)
    )
    return statement, plan


def filtered(
    dialect: str, filters: Mapping[str, frozenset[str]], dimensions: sa.ColumnElement[Any]
) -> list[sa.ColumnElement[bool]]:
    """A condition per filter: the dimension has one of the values, an absent one being
    `""` as in a group (`rules.admits`); read as it is where `""` is not a value asked
    for."""
    return [
        (
            sa.func.coalesce(dimension(dialect, key, dimensions), "")
            if "" in values
            else dimension(dialect, key, dimensions)
        ).in_(sorted(values))
        for key, values in filters.items()
    ]


def _from_rollups(
    dialect: str, meter_seq: int, meter: Meter, plan: rules.QueryPlan
) -> sa.Select[Any]:
    """Across customers, over whole quarter hours: the rollups answer sum, count and avg
    without reading the events (each window is a run of whole buckets; a rollup row holds
    one set of dimensions, so filters apply to it as to an event)."""
    micros, keys = plan.micros, plan.keys
    window = _window_number(dialect, micros, rollups.c.bucket).label("window")
    stored: sa.ColumnElement[Any] = rollups.c.dimensions  # the events' JSON, as text
    if dialect == "postgresql":
        stored = sa.cast(stored, postgresql.JSON)
    groups: list[sa.ColumnElement[Any]] = [window]
    groups += [
        sa.func.coalesce(dimension(dialect, key, stored), "").label(f"d{i}")
        for i, key in enumerate(keys)
    ]
    count = sa.func.sum(rollups.c.count)
    total = (
        sa.func.sum(rollups.c.total)
        if dialect == "postgresql"
        else sa.func.dec_sum(rollups.c.total)
    )
    by_aggregation: dict[Aggregation, list[sa.ColumnElement[Any]]] = {
        Aggregation.SUM: [total],
        Aggregation.COUNT: [count],
        Aggregation.AVG: [total, count],
    }
    folds = by_aggregation[meter.aggregation]
    return (
        sa.select(*groups, *folds)
        .where(
            rollups.c.meter_seq == meter_seq,
            rollups.c.bucket >= micros[0],
            rollups.c.bucket < micros[-1],
            *filtered(dialect, plan.filters, stored),
        )
        .group_by(*groups)
        .having(count > 0)  # every event of the group cancelled: no row, as on memory
        .limit(MAX_ROWS + 1)
    )


def usage_rows(
    rows: Sequence[Any], meter: Meter, query: UsageQuery, plan: rules.QueryPlan
) -> list[UsageRow]:
    """Typed rows in the order every provider gives: window, customer, group."""
    if len(rows) > MAX_ROWS:
        raise too_many_rows(query)
    by_customer = plan.by_customer
    width = 1 + by_customer + len(plan.keys)
    built = []
    for row in rows:
        window = int(row[0])
        customer = row[1] if by_customer else None
        group = tuple(row[1 + by_customer : width])
        value = _value(meter.aggregation, row[width:])
        built.append((window, customer, group, plan.row(window, customer, group, value)))
    return rules.ordered_rows(built)
