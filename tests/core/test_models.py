"""Model validation: every bad field is refused with its name and value."""

import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from metering_core import (
    IngestResult,
    MeterCreate,
    MeterUpdate,
    UsageEvent,
    UsageQuery,
    ValidationError,
)


def event(**fields: object) -> UsageEvent:
    return UsageEvent(**{"event_name": "api_calls", "customer_id": "t1", **fields})


def test_event_defaults_give_a_fresh_id_and_an_aware_now() -> None:
    first, second = event(), event()
    assert first.id != second.id
    assert first.timestamp.tzinfo is UTC
    assert abs(first.timestamp - datetime.now(UTC)) < timedelta(seconds=5)
    assert first.value == Decimal(1)


def test_a_sub_second_offset_cannot_carry_a_time_past_the_bound() -> None:
    """pydantic cuts offsets to whole seconds before its check; the bound still holds."""
    last = datetime(2999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(-timedelta(microseconds=1)))
    with pytest.raises(ValidationError, match="timestamp"):
        event(timestamp=last)


def test_the_bounds_are_instants_whatever_the_offset() -> None:
    """2999-12-31 23:00 at UTC+5 is before 3000 UTC; the same at UTC-5 is not."""
    east = event(timestamp=datetime(2999, 12, 31, 23, tzinfo=timezone(timedelta(hours=5))))
    assert east.timestamp == datetime(2999, 12, 31, 18, tzinfo=UTC)
    assert event(timestamp=datetime(1900, 1, 1, tzinfo=UTC)).timestamp.year == 1900


def test_timestamps_are_normalised_to_utc() -> None:
    paris_summer = timezone(timedelta(hours=2))
    stamped = event(timestamp=datetime(2026, 7, 1, 12, 0, tzinfo=paris_summer))
    assert stamped.timestamp == datetime(2026, 7, 1, 10, 0, tzinfo=UTC)
    assert stamped.timestamp.tzinfo is UTC


@pytest.mark.parametrize(
    "given",
    [
        "2026-11-25T10:20:30.123456Z",  # pydantic's own UTC, not datetime's
        "2026-11-25T10:20:30.123456+00:00",
        "2026-11-25T10:20:30.123456-00:00",
        datetime(2026, 11, 25, 10, 20, 30, 123456, tzinfo=ZoneInfo("Europe/London")),  # GMT
        datetime(2026, 11, 25, 10, 20, 30, 123456, tzinfo=timezone(timedelta(0), "Z0")),
    ],
    ids=["Z", "+00:00", "-00:00", "London in winter", "a named zero offset"],
)
def test_a_time_at_offset_zero_keeps_every_field_and_becomes_utc(given: object) -> None:
    stamped = event(timestamp=given).timestamp
    assert stamped.tzinfo is UTC
    assert stamped == datetime(2026, 11, 25, 10, 20, 30, 123456, tzinfo=UTC)
    assert (stamped.hour, stamped.minute, stamped.second, stamped.microsecond) == (
        10,
        20,
        30,
        123456,
    )


@pytest.mark.parametrize(
    ("given", "ok"),
    [
        ("1900-01-01T00:00:00Z", True),
        ("1899-12-31T23:59:59.999999Z", False),
        ("2999-12-31T23:59:59.999999Z", True),
        ("3000-01-01T00:00:00Z", False),
        ("3000-01-01T00:00:00+00:00", False),
    ],
)
def test_the_bounds_hold_at_offset_zero_to_the_microsecond(given: str, ok: bool) -> None:
    if ok:
        assert event(timestamp=given).timestamp.isoformat().startswith(given[:19])
    else:
        with pytest.raises(ValidationError, match="timestamp"):
            event(timestamp=given)


def test_float_values_keep_their_decimal_spelling() -> None:
    assert event(value=0.1).value == Decimal("0.1")
    assert event(value="12.50").value == Decimal("12.50")


@pytest.mark.parametrize(
    ("field", "value", "shown", "says"),
    [
        ("event_name", "API Calls", "'API Calls'", "slug"),
        ("event_name", "x" * 101, "'xxxxxxxx", "slug"),
        ("value", "nan", "'nan'", "finite"),
        ("value", float("inf"), "inf", "finite"),
        ("value", "1e999999", "'1e999999'", "no more than 38 digits"),
        ("value", "0.0000000000000000001", "'0.0000000000000000001'", "no more than 18 decimal"),
        ("timestamp", datetime(2026, 1, 1), "datetime(2026, 1, 1, 0, 0)", "timezone"),
        ("id", "", "id=''", "at least 1"),
        ("id", "i" * 101, "'iiiiiiii", "at most 100"),
        ("customer_id", "", "customer_id=''", "at least 1"),
        ("dimensions", {"region": 3}, "dimensions.region=3", "string"),
        ("customer_id", "t\ud800", "'t\\ud800'", "not valid Unicode"),
        ("dimensions", {"region": "\udc00"}, "dimensions.region", "not valid Unicode"),
        ("id", "e\x00", "'e\\x00'", "NUL"),
        ("timestamp", datetime(2999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=5))), "", "3000"),
        ("timestamp", datetime(1900, 1, 1, 2, tzinfo=timezone(timedelta(hours=5))), "", "1900"),
        ("timestamp", datetime(9999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=5))), "", "3000"),
    ],
)
def test_a_bad_field_is_named_with_its_value(
    field: str, value: object, shown: str, says: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        event(**{field: value})
    assert caught.value.field is not None
    assert caught.value.field.split(".")[0] == field
    assert f"{field}" in str(caught.value)
    assert shown in str(caught.value)
    assert says in str(caught.value)


def test_validation_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError, match="event_name"):
        event(event_name="Bad")


def test_unknown_fields_are_refused_not_ignored() -> None:
    with pytest.raises(ValidationError, match="custmer_id"):
        UsageEvent(event_name="a", customer_id="t", custmer_id="typo")  # type: ignore[call-arg]


def test_model_validate_reports_the_same_way() -> None:
    with pytest.raises(ValidationError) as caught:
        UsageEvent.model_validate({"event_name": "a", "customer_id": "t", "value": "lots"})
    assert caught.value.field == "value"
    assert "'lots'" in str(caught.value)


def test_unique_count_needs_its_dimension_and_others_refuse_one() -> None:
    with pytest.raises(ValidationError, match="unique_dimension"):
        MeterCreate(event_name="mau", aggregation="unique_count")
    with pytest.raises(ValidationError, match="unique_dimension"):
        MeterCreate(event_name="calls", aggregation="sum", unique_dimension="user")
    assert MeterCreate(event_name="mau", aggregation="unique_count", unique_dimension="user")


def test_meter_update_needs_a_field() -> None:
    with pytest.raises(ValidationError, match="at least one field"):
        MeterUpdate()
    assert MeterUpdate(display_name="New").model_fields_set == {"display_name"}


def test_query_range_must_be_forward_and_tz_real() -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValidationError, match="must be after start"):
        UsageQuery(meter_id="m", start=now, end=now)
    with pytest.raises(ValidationError) as caught:
        UsageQuery(meter_id="m", start=now, end=now + timedelta(days=1), tz="Mars/Olympus")
    assert caught.value.field == "tz"
    with pytest.raises(ValidationError, match="window"):
        UsageQuery(meter_id="m", start=now, end=now + timedelta(days=1), window="week")


def test_ingest_results_merge_without_losing_ids() -> None:
    merged = IngestResult(accepted=["a"], rejected={"x": "bad"}).merge(
        IngestResult(accepted=["b"], duplicates=["a"], rejected={"y": "worse"})
    )
    assert merged.accepted == ["a", "b"]
    assert merged.duplicates == ["a"]
    assert merged.rejected == {"x": "bad", "y": "worse"}
    assert not merged.ok


@pytest.mark.parametrize(
    "fields",
    [
        {"customer_id": "a\x00b"},
        {"id": "e\x00"},
        {"dimensions": {"r": "x\x00"}},
        {"dimensions": {"r\x00": "x"}},
    ],
)
def test_a_nul_character_is_refused_before_any_store_sees_it(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="NUL"):
        UsageEvent(**{"event_name": "api_calls", "customer_id": "t", **fields})


def test_default_ids_are_uuid7_in_the_order_they_were_made() -> None:
    """Time-ordered ids keep a store's unique index growing at its end."""
    first = [event().id for _ in range(1000)]
    time.sleep(0.002)
    later = event().id
    assert len(set(first)) == 1000
    parsed = [uuid.UUID(i) for i in [*first, later]]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    millis = [u.int >> 80 for u in parsed]
    assert millis == sorted(millis)
    assert millis[-1] > millis[0]
    assert abs(millis[-1] - time.time_ns() // 1_000_000) < 5_000
    as_made = [*first, later]
    assert as_made == sorted(as_made)  # as text: how a `latest` meter's ties compare them


def test_default_ids_only_increase_though_the_clock_stands_still_or_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within a millisecond the fraction, and past the clock's resolution a counter,
    keep one process's ids in the order it made them."""
    now = time.time_ns()
    clock = iter([now] * 5000 + [now - 10**9] * 10 + [now + 10**6] * 10)
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    made = [event().id for _ in range(5020)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    parsed = [uuid.UUID(i) for i in made]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    # 5,020 ids a 4,096th of a millisecond apart from one reading: two milliseconds on
    millis = {u.int >> 80 for u in parsed}
    assert min(millis) == now // 10**6
    assert max(millis) - min(millis) in (1, 2)
