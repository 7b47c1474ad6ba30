"""Calendar windows in a time zone: where each minute, hour, day or month of a query begins.

Shared by providers so every one cuts time the same way. Windows are the zone's wall-clock
minutes, hours, days and months: a day in Europe/Paris runs from local midnight to local midnight,
23 or 25 hours long around a DST change; where a change of offset falls inside an hour
(Australia/Lord_Howe's 30 minutes, Asia/Kathmandu's 15 in 1986), that hour is shorter or
longer, and the next begins on the clock's next whole hour, never 30 minutes off it.
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


_TICK = timedelta(microseconds=1)
_CLOCK_UNITS = {Window.MINUTE: timedelta(minutes=1), Window.HOUR: timedelta(hours=1)}


def _cut(local: datetime, unit: timedelta) -> datetime:
    """A naive local time cut to the start of its minute or hour."""
    cut = local.replace(second=0, microsecond=0)
    return cut.replace(minute=0) if unit > timedelta(minutes=1) else cut


def _clock_label(moment: datetime, zone: ZoneInfo, unit: timedelta) -> tuple[datetime, int]:
    """The wall-clock minute or hour an instant falls in: the local time cut to the unit,
    and which pass of the clock (`fold`: 1 for the second time a set-back clock shows it)."""
    local = moment.astimezone(zone)
    return _cut(local.replace(tzinfo=None, fold=0), unit), local.fold


def _offset_change(low: datetime, high: datetime, zone: ZoneInfo) -> datetime | None:
    """The first instant in (low, high] whose UTC offset differs from low's; None if the
    offset at high is low's (a zone changes its offset at most once within an hour)."""
    first = low.astimezone(zone).utcoffset()
    if high.astimezone(zone).utcoffset() == first:
        return None
    while high - low > _TICK:
        middle = low + (high - low) // 2
        if middle.astimezone(zone).utcoffset() == first:
            low = middle
        else:
            high = middle
    return high


def _clock_bounds(
    start: datetime, end: datetime, zone: ZoneInfo, unit: timedelta
) -> list[datetime]:
    """The instants in (start, end) where the wall-clock minute or hour changes: where the
    clock reaches the next unit, or where a change of offset moves it into another unit
    or another pass of a set-back clock (each pass is its own window). Walked in UTC, so
    no wall time is ever converted back (a wall time in a gap or a repeat has no one
    instant)."""
    bounds: list[datetime] = []
    moment = start
    while True:
        local = moment.astimezone(zone).replace(tzinfo=None)
        reached = moment + (unit - (local - _cut(local, unit)))  # the next unit, same offset
        change = _offset_change(moment, reached, zone)
        moment = reached if change is None else change
        if moment >= end:
            return bounds
        # the clock reaching the next unit is a bound; a change of offset, where it moves
        # the clock into another unit or pass
        if change is None or _clock_label(moment, zone, unit) != _clock_label(
            moment - _TICK, zone, unit
        ):
            bounds.append(moment)


def _calendar_starts(
    start: datetime, end: datetime, window: Window, zone: ZoneInfo
) -> list[datetime]:
    """Day or month starts (UTC) from at or before `start` to the first at or after `end`
    (those outside the range are dropped by `window_bounds`)."""
    local = start.astimezone(zone)
    starts: list[datetime] = []
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
    if query.window in _CLOCK_UNITS:
        inner = _clock_bounds(query.start, query.end, query.zone, _CLOCK_UNITS[query.window])
    else:
        starts = _calendar_starts(query.start, query.end, query.window, query.zone)
        inner = [moment for moment in starts if query.start < moment < query.end]
    return [query.start, *inner, query.end]
