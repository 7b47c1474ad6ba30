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


def _clock_label(moment: datetime, zone: ZoneInfo, unit: timedelta) -> tuple[datetime, int]:
    """The wall-clock minute or hour an instant falls in: the local time cut to the unit,
    and which pass of the clock (`fold`: 1 for the second time a set-back clock shows it)."""
    local = moment.astimezone(zone)
    cut = local.replace(second=0, microsecond=0, tzinfo=None, fold=0)
    if unit > timedelta(minutes=1):
        cut = cut.replace(minute=0)
    return cut, local.fold


def _label_change(low: datetime, high: datetime, zone: ZoneInfo, unit: timedelta) -> datetime:
    """The first instant in (low, high] whose wall-clock unit differs from low's: an offset
    change inside the unit (the label is constant on each side of it)."""
    first = _clock_label(low, zone, unit)
    while high - low > _TICK:
        middle = low + (high - low) // 2
        if _clock_label(middle, zone, unit) == first:
            low = middle
        else:
            high = middle
    return high


def _clock_starts(
    start: datetime, end: datetime, zone: ZoneInfo, unit: timedelta
) -> list[datetime]:
    """Starts (UTC) of wall-clock minutes or hours, from at or before `start` to the first
    at or after `end`. A clock unit begins where the clock shows it (each pass of a set-back
    clock), or where a change of offset moves the clock into it off the unit (a zone's
    offset in seconds, as local mean times had)."""
    starts: list[datetime] = []
    wall, _ = _clock_label(start, zone, unit)
    wall -= unit  # the unit holding `start` may begin before its own clock time (a jump)
    previous: datetime | None = None
    while True:
        for fold in (0, 1):  # a wall time in a gap maps to the end of the gap (fold=0)
            moment = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
            if previous is not None and moment > previous:
                if _clock_label(previous, zone, unit) != _clock_label(moment - _TICK, zone, unit):
                    starts.append(_label_change(previous, moment, zone, unit))
                starts.append(moment)
            elif previous is None:
                starts.append(moment)
            previous = moment if previous is None else max(previous, moment)
        if starts[-1] >= end:
            return sorted(set(starts))
        wall += unit


def _calendar_starts(
    start: datetime, end: datetime, window: Window, zone: ZoneInfo
) -> list[datetime]:
    """Window starts (UTC) from at or before `start` to the first at or after `end` (those
    outside the range are dropped by `window_bounds`)."""
    if window in _CLOCK_UNITS:
        return _clock_starts(start, end, zone, _CLOCK_UNITS[window])
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
    starts = _calendar_starts(query.start, query.end, query.window, query.zone)
    inner = [moment for moment in starts if query.start < moment < query.end]
    return [query.start, *inner, query.end]
