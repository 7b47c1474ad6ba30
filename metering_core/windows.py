"""Calendar windows in a time zone: where each hour, day or month of a query begins.

Shared by providers so every one cuts time the same way: a day in Europe/Paris runs
from local midnight to local midnight, 23 or 25 hours long around a DST change.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from metering_core.models import UsageQuery, Window

__all__ = ["window_bounds"]


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _calendar_starts(
    start: datetime, end: datetime, window: Window, zone: ZoneInfo
) -> list[datetime]:
    """Window starts (UTC) from the window holding `start` to the first at or after `end`."""
    local = start.astimezone(zone)
    starts: list[datetime] = []
    if window is Window.HOUR:
        moment = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        while True:
            starts.append(moment)
            if moment >= end:
                return starts
            moment += timedelta(hours=1)
    day = local.date() if window is Window.DAY else local.date().replace(day=1)
    while True:
        moment = _local_midnight(day, zone)
        starts.append(moment)
        if moment >= end:
            return starts
        day = day + timedelta(days=1) if window is Window.DAY else _next_month(day)


def window_bounds(query: UsageQuery) -> list[datetime]:
    """Boundaries b0 < b1 < … < bn with b0 = start and bn = end; row i spans [b_i, b_{i+1}).

    Windows are calendar-aligned in `query.tz` and the first and last are clipped to the
    query's range. Without a window there is one row: [start, end).
    """
    if query.window is None:
        return [query.start, query.end]
    starts = _calendar_starts(query.start, query.end, query.window, query.zone)
    inner = [moment for moment in starts if query.start < moment < query.end]
    return [query.start, *inner, query.end]
