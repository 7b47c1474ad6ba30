"""Usage from Stripe's meter event summaries: which summaries to ask for, and how to fold
them into the calendar windows of the query (months and non-UTC days from hours)."""

from __future__ import annotations

import bisect
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from metering_core.errors import ValidationError
from metering_core.models import Aggregation, UsageQuery, UsageRow, Window
from metering_core.windows import window_bounds

__all__ = ["fold_summaries", "summary_request"]


def _on(moment: datetime, seconds: int) -> bool:
    return int(moment.timestamp()) % seconds == 0 and moment.microsecond == 0


def summary_request(query: UsageQuery) -> tuple[str | None, list[datetime]]:
    """Stripe's `value_grouping_window` for the query, and the query's row boundaries.

    Stripe groups by UTC hour or UTC day, with aligned start and end. Days and months in
    UTC come from day summaries; anything else from hour summaries, so every row boundary
    must fall on an hour (true of any zone with whole-hour offsets).
    """
    bounds = window_bounds(query)
    if query.window is None:
        for name, moment in (("start", query.start), ("end", query.end)):
            if not _on(moment, 60):
                raise ValidationError(
                    f"{name}={moment.isoformat()}: Stripe needs minute boundaries",
                    field=name,
                    value=moment,
                )
        return None, bounds
    daily = query.tz == "UTC" and query.window in (Window.DAY, Window.MONTH)
    seconds = 86_400 if daily and all(_on(b, 86_400) for b in bounds) else 3600
    for index, moment in enumerate(bounds):
        if not _on(moment, seconds):
            field = "start" if index == 0 else "end" if index == len(bounds) - 1 else "tz"
            raise ValidationError(
                f"{field}: {moment.isoformat()} is not on a UTC hour boundary, which Stripe's "
                f"{query.window.value} usage needs (tz={query.tz!r})",
                field=field,
                value=moment,
            )
    return ("day" if seconds == 86_400 else "hour"), bounds


def _value(raw: float, aggregation: Aggregation) -> Decimal:
    """Stripe's `aggregated_value`, a float: a whole number as it is (exact to 2**53, so a
    count of 16 digits keeps them all); else to 15 significant digits, which a float
    holds exactly, so the sum 0.1 + 0.2 reads 0.3 as the ledger's does, not
    0.30000000000000004 (a drift reconcile would report, and repair with 1E-16, for
    ever)."""
    value = Decimal(int(raw)) if raw.is_integer() else Decimal(format(raw, ".15g"))
    return value.to_integral_value() if aggregation is Aggregation.COUNT else value


def fold_summaries(
    summaries: list[Any], bounds: list[datetime], aggregation: Aggregation, customer_id: str
) -> list[UsageRow]:
    """One row per query window with summaries: sum or count add up; latest takes the last.
    Each summary finds its window by bisection: a reconcile folds 31 days for each of
    thousands of customers, where a scan of every summary per window cost a tenth of it."""
    edges = [int(b.timestamp()) for b in bounds]
    inside: dict[int, list[Decimal]] = {}
    for summary in sorted(summaries, key=lambda s: int(s["start_time"])):
        start = int(summary["start_time"])
        index = bisect.bisect_right(edges, start) - 1
        if 0 <= index < len(edges) - 1:
            value = _value(float(summary["aggregated_value"]), aggregation)
            inside.setdefault(index, []).append(value)
    rows = []
    for index, values in inside.items():  # windows in order: the summaries were
        value = values[-1] if aggregation is Aggregation.LATEST else sum(values, Decimal(0))
        rows.append(
            UsageRow(
                start=bounds[index], end=bounds[index + 1], customer_id=customer_id, value=value
            )
        )
    return rows


def unix(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp())
