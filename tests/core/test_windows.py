"""Where windows begin: the zone's wall-clock hours, days and months, asserted against
fixed expectations and a brute-force walk of the clock (memory and sql share
`window_bounds`, so comparing the two stores cannot catch a fault here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from metering_core import Metering, UsageQuery
from metering_core.windows import window_bounds


def bounds(start: datetime, end: datetime, window: str | None, tz: str = "UTC") -> list[str]:
    query = UsageQuery(meter_id="m", start=start, end=end, window=window, tz=tz)
    return [moment.astimezone(ZoneInfo(tz)).isoformat() for moment in window_bounds(query)]


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def test_without_a_window_one_row_spans_the_range() -> None:
    assert bounds(utc(2026, 1, 1, 0, 7), utc(2026, 1, 3), None) == [
        "2026-01-01T00:07:00+00:00",
        "2026-01-03T00:00:00+00:00",
    ]


def test_a_start_off_the_hour_is_clipped_and_later_hours_start_on_the_hour() -> None:
    start = utc(2026, 1, 1, 5, 40, 7, 123)
    assert bounds(start, utc(2026, 1, 1, 8, 0, 0, 1), "hour") == [
        "2026-01-01T05:40:07.000123+00:00",
        "2026-01-01T06:00:00+00:00",
        "2026-01-01T07:00:00+00:00",
        "2026-01-01T08:00:00+00:00",
        "2026-01-01T08:00:00.000001+00:00",
    ]


def test_hours_in_a_half_hour_zone_start_on_its_clock_hour() -> None:
    assert bounds(utc(2026, 1, 1, 0, 10), utc(2026, 1, 1, 2), "hour", "Asia/Kolkata") == [
        "2026-01-01T05:40:00+05:30",
        "2026-01-01T06:00:00+05:30",
        "2026-01-01T07:00:00+05:30",
        "2026-01-01T07:30:00+05:30",
    ]


def test_a_thirty_minute_spring_forward_makes_one_short_hour() -> None:
    """Lord Howe Island: 02:00 becomes 02:30. The "02" hour lasts 30 minutes and 03:10 is
    billed in 03:00-04:00 (it was billed in an "hour" 02:30-03:30)."""
    tz = "Australia/Lord_Howe"
    assert bounds(utc(2026, 10, 3, 14, 30), utc(2026, 10, 3, 18), "hour", tz) == [
        "2026-10-04T01:00:00+10:30",
        "2026-10-04T02:30:00+11:00",
        "2026-10-04T03:00:00+11:00",
        "2026-10-04T04:00:00+11:00",
        "2026-10-04T05:00:00+11:00",
    ]


def test_a_thirty_minute_set_back_repeats_half_an_hour_as_its_own_window() -> None:
    tz = "Australia/Lord_Howe"
    assert bounds(utc(2026, 4, 4, 14), utc(2026, 4, 4, 16, 30), "hour", tz) == [
        "2026-04-05T01:00:00+11:00",
        "2026-04-05T01:30:00+10:30",  # the clock shows 01:30 again: its second pass
        "2026-04-05T02:00:00+10:30",
        "2026-04-05T03:00:00+10:30",
    ]


def test_a_fifteen_minute_jump_at_midnight_shortens_the_first_hour_of_the_day() -> None:
    """Nepal moved from +05:30 to +05:45 at the start of 1986: 00:00 became 00:15."""
    tz = "Asia/Kathmandu"
    assert bounds(utc(1985, 12, 31, 17, 30), utc(1985, 12, 31, 20, 15), "hour", tz) == [
        "1985-12-31T23:00:00+05:30",
        "1986-01-01T00:15:00+05:45",
        "1986-01-01T01:00:00+05:45",
        "1986-01-01T02:00:00+05:45",
    ]
    assert bounds(utc(1985, 12, 30, 18, 30), utc(1986, 1, 2), "day", tz) == [
        "1985-12-31T00:00:00+05:30",
        "1986-01-01T00:15:00+05:45",  # the day begins when its clock does
        "1986-01-02T00:00:00+05:45",
        "1986-01-02T05:45:00+05:45",
    ]


def test_an_hour_set_back_is_two_windows_of_an_hour_and_days_follow_the_clock() -> None:
    tz = "Europe/Paris"
    assert bounds(utc(2026, 10, 25, 0), utc(2026, 10, 25, 3), "hour", tz) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T04:00:00+01:00",
    ]
    days = bounds(utc(2026, 3, 28, 23), utc(2026, 3, 30, 22), "day", tz)
    assert days == [
        "2026-03-29T00:00:00+01:00",
        "2026-03-30T00:00:00+02:00",
        "2026-03-31T00:00:00+02:00",
    ]


def test_months_follow_the_calendar_from_a_start_inside_one() -> None:
    assert bounds(utc(2026, 1, 15), utc(2026, 4, 1, 4), "month", "America/New_York") == [
        "2026-01-14T19:00:00-05:00",
        "2026-02-01T00:00:00-05:00",
        "2026-03-01T00:00:00-05:00",
        "2026-04-01T00:00:00-04:00",
    ]


def _wall_hour(moment: datetime, zone: ZoneInfo) -> tuple[datetime, int]:
    local = moment.astimezone(zone)
    return local.replace(minute=0, second=0, tzinfo=None), local.fold


@pytest.mark.parametrize(
    ("tz", "around"),
    [
        ("Australia/Lord_Howe", utc(2026, 4, 4, 15)),
        ("Australia/Lord_Howe", utc(2026, 10, 3, 15, 30)),
        ("Asia/Kathmandu", utc(1985, 12, 31, 18, 30)),
        ("Europe/Paris", utc(2026, 3, 29, 1)),
        ("Europe/Paris", utc(2026, 10, 25, 1)),
        ("America/St_Johns", utc(2026, 11, 1, 4, 30)),
        ("Antarctica/Troll", utc(2026, 10, 25, 1)),  # set back two hours: 01:00-03:00 twice
        ("Antarctica/Troll", utc(2026, 3, 29, 1)),
        ("Asia/Kolkata", utc(2026, 6, 1)),
    ],
)
def test_hour_windows_begin_exactly_where_the_clock_changes_hour(tz: str, around: datetime) -> None:
    """Brute force: walk the clock a minute at a time; a window begins where the wall-clock
    hour (or the clock's pass through it) changes, and nowhere else."""
    zone = ZoneInfo(tz)
    start, end = around - timedelta(hours=5, minutes=7), around + timedelta(hours=5)
    expected = [start]
    moment = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while moment < end:
        if _wall_hour(moment, zone) != _wall_hour(moment - timedelta(minutes=1), zone):
            expected.append(moment)
        moment += timedelta(minutes=1)
    query = UsageQuery(meter_id="m", start=start, end=end, window="hour", tz=tz)
    assert window_bounds(query) == [*expected, end]


@pytest.mark.parametrize("provider", ["memory", "sql"])
def test_usage_at_ten_past_three_on_lord_howe_is_billed_in_the_three_oclock_hour(
    provider: str, tmp_path: object
) -> None:
    options = {"url": f"sqlite:///{tmp_path}/store.db"} if provider == "sql" else {}
    zone = ZoneInfo("Australia/Lord_Howe")
    at = datetime(2026, 10, 4, 3, 10, tzinfo=zone)
    with Metering(provider, **options) as m:
        meter = m.create_meter(event_name="api_calls")
        m.ingest_usage_event(event_name="api_calls", customer_id="t1", value=5, timestamp=at)
        assert m.flush().ok
        usage = m.fetch_usage(
            meter.id,
            start=datetime(2026, 10, 4, tzinfo=zone),
            end=datetime(2026, 10, 5, tzinfo=zone),
            window="hour",
            tz="Australia/Lord_Howe",
        )
    [row] = usage.rows
    assert (row.start.astimezone(zone).isoformat(), row.end - row.start, row.value) == (
        "2026-10-04T03:00:00+11:00",
        timedelta(hours=1),
        5,
    )


@pytest.mark.parametrize("host_zone", ["Asia/Kolkata", "America/St_Johns"])
@pytest.mark.parametrize("window", ["hour", "day", "month"])
def test_bounds_are_utc_whatever_the_hosts_own_zone(
    monkeypatch: pytest.MonkeyPatch, host_zone: str, window: str
) -> None:
    """A service whose machine runs in another zone (TZ) cuts the same windows, in UTC."""
    import time

    expected = window_bounds(
        UsageQuery(
            meter_id="m",
            start=utc(2026, 4, 4, 7, 10),
            end=utc(2026, 7, 6),
            window=window,
            tz="Australia/Lord_Howe",
        )
    )
    monkeypatch.setenv("TZ", host_zone)
    time.tzset()
    try:
        query = UsageQuery(
            meter_id="m",
            start=utc(2026, 4, 4, 7, 10),
            end=utc(2026, 7, 6),
            window=window,
            tz="Australia/Lord_Howe",
        )
        got = window_bounds(query)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert got == expected
    assert {moment.utcoffset() for moment in got} == {timedelta(0)}
    assert {moment.tzinfo for moment in got} == {UTC}


def _wall_clock_bounds(start: datetime, end: datetime, zone: ZoneInfo, unit: str) -> list[datetime]:
    """The reference, by brute force: a bound at every second where the wall clock's
    minute or hour (and which pass of a set-back clock) differs from the second before."""

    def label(moment: datetime) -> tuple[datetime, int]:
        local = moment.astimezone(zone)
        cut = local.replace(second=0, microsecond=0, tzinfo=None, fold=0)
        return (cut.replace(minute=0) if unit == "hour" else cut), local.fold

    bounds, previous = [start], label(start)
    moment = start.replace(microsecond=0) + timedelta(seconds=1)
    while moment < end:
        if label(moment) != previous:
            bounds.append(moment)
        previous = label(moment)
        moment += timedelta(seconds=1)
    return [*bounds, end]


CLOCK_CHANGES = [  # a zone, and a UTC time shortly before one of its changes of offset
    ("Europe/Paris", datetime(2024, 10, 27, 0, tzinfo=UTC)),  # set back an hour
    ("Europe/Paris", datetime(2024, 3, 31, 0, tzinfo=UTC)),  # set forward an hour
    ("America/St_Johns", datetime(2024, 11, 3, 3, tzinfo=UTC)),  # a -3:30 zone set back
    ("Australia/Lord_Howe", datetime(2024, 4, 6, 14, tzinfo=UTC)),  # back 30 minutes
    ("Australia/Lord_Howe", datetime(2024, 10, 5, 15, tzinfo=UTC)),  # forward 30 minutes
    ("Asia/Kathmandu", datetime(1985, 12, 31, 18, tzinfo=UTC)),  # +5:30 to +5:45
    ("Africa/Monrovia", datetime(1972, 1, 6, 23, tzinfo=UTC)),  # -0:44:30 to 0
    ("Europe/Amsterdam", datetime(1937, 6, 30, 22, tzinfo=UTC)),  # +1:19:32 to +1:20
    ("Europe/Amsterdam", datetime(1940, 5, 15, 22, tzinfo=UTC)),  # +0:20 to +2:00
    ("Europe/Dublin", datetime(1916, 10, 1, 0, tzinfo=UTC)),  # Dublin Mean Time to GMT
    ("Pacific/Apia", datetime(2011, 12, 29, 9, tzinfo=UTC)),  # a whole day skipped
]


@pytest.mark.parametrize(("zone", "near"), CLOCK_CHANGES)
@pytest.mark.parametrize("unit", ["minute", "hour"])
@pytest.mark.parametrize("off_grid", [timedelta(0), timedelta(seconds=7, microseconds=123)])
def test_minute_and_hour_windows_follow_the_wall_clock_through_every_kind_of_change(
    zone: str, near: datetime, unit: str, off_grid: timedelta
) -> None:
    """Each pass of a set-back clock is its own run of windows; a jump of any size (half
    an hour, 44.5 minutes, seconds of a local mean time) starts a window where it lands;
    no window is merged across a change, and none is made up."""
    start = near + off_grid
    end = start + timedelta(hours=3)
    query = UsageQuery(meter_id="m", start=start, end=end, window=unit, tz=zone)
    assert window_bounds(query) == _wall_clock_bounds(start, end, ZoneInfo(zone), unit)
