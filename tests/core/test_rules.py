"""The billing rules every store follows, each asserted on its own (the stores are compared
with each other elsewhere; a rule wrong in both would pass that comparison)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from metering_core import Aggregation, Meter, UsageEvent, UsageQuery, ValidationError
from metering_core.rules import (
    FOLDS,
    Bucket,
    average,
    cancel_verdicts,
    cancellable,
    canonical,
    ingest_verdicts,
    plan_query,
    refusal,
)

START = datetime(2026, 3, 1, tzinfo=UTC)


@dataclass
class Kind:
    id: str = "mtr_1"
    unique_dimension: str | None = None


def event(event_id: str, **fields: object) -> UsageEvent:
    return UsageEvent(id=event_id, event_name="api_calls", customer_id="t", **fields)  # type: ignore[arg-type]


def test_an_event_without_a_meter_is_refused_naming_its_event_name() -> None:
    assert refusal(None, event("e")) == "no meter for event_name='api_calls'"


def test_a_unique_count_event_without_its_counted_dimension_is_refused() -> None:
    counted = Kind(unique_dimension="user")
    assert refusal(counted, event("e", dimensions={"user": "u1"})) is None
    reason = refusal(counted, event("e", dimensions={"region": "eu"}))
    assert reason == "unique_count meter mtr_1 needs dimension 'user' on every event"
    assert refusal(Kind(), event("e")) is None


def test_each_copy_of_a_batch_is_answered_once_and_the_first_stored_wins() -> None:
    batch = [event(i) for i in ("old", "new", "new", "bad", "raced", "bad2", "bad2")]
    refusals = [None, None, None, "no meter", None, "no meter", None]
    result = ingest_verdicts(batch, refusals, inserted={"new", "bad2"}, known_before={"old"})
    assert result.accepted == ["new", "bad2"]
    assert result.duplicates == ["old", "new", "raced"]  # raced: another writer stored it
    assert result.rejected == {"bad": "no meter", "bad2": "no meter"}


def test_an_id_stored_before_is_a_duplicate_even_when_refused_now() -> None:
    result = ingest_verdicts([event("e")], ["no meter"], inserted=set(), known_before={"e"})
    assert (result.duplicates, result.rejected) == (["e"], {})


def test_cancellable_ids_are_stored_and_of_the_event_name_asked_for() -> None:
    names = {"a": "api_calls", "b": "storage"}
    assert cancellable(["a", "b", "zz"], names, None) == ["a", "b"]
    assert cancellable(["a", "b", "zz"], names, "storage") == ["b"]


def test_each_id_of_a_cancellation_gets_one_verdict() -> None:
    names = {"a": "api_calls", "b": "storage", "c": "api_calls"}
    result = cancel_verdicts(["a", "a", "b", "c", "zz"], names, {"a"}, "api_calls")
    assert result.cancelled == ["a"]
    assert result.not_found == ["zz"]
    assert result.rejected == {
        "a": "event 'a' is already cancelled",  # named twice: the second finds it cancelled
        "b": "event 'b' has event_name='storage', not 'api_calls'",
        "c": "event 'c' is already cancelled",
    }


def meter(**fields: object) -> Meter:
    return Meter(
        id="mtr_1",
        event_name="api_calls",
        display_name="x",
        created_at=START,
        updated_at=START,
        **fields,  # type: ignore[arg-type]
    )


def test_a_query_groups_only_by_declared_dimensions_or_the_customer() -> None:
    with pytest.raises(ValidationError) as refused:
        plan_query(
            meter(dimensions=["region"]),
            UsageQuery(meter_id="m", start=START, end=START + timedelta(days=1), group_by=["plan"]),
        )
    assert (refused.value.field, refused.value.value) == ("group_by", "plan")
    assert "dimensions: ['region'], or 'customer_id'" in str(refused.value)


@pytest.mark.parametrize(
    ("group_by", "customer_id", "keys", "by_customer"),
    [
        ((), None, [], False),
        (("customer_id",), None, [], True),
        (("region",), "t1", ["region"], True),
        (("region", "customer_id"), None, ["region"], True),
    ],
)
def test_rows_are_per_customer_when_grouped_by_customer_or_one_is_named(
    group_by: tuple[str, ...], customer_id: str | None, keys: list[str], by_customer: bool
) -> None:
    query = UsageQuery(
        meter_id="m",
        start=START,
        end=START + timedelta(hours=2),
        window="hour",
        group_by=group_by,
        customer_id=customer_id,
    )
    plan = plan_query(meter(dimensions=["region"]), query)
    assert (plan.keys, plan.by_customer, plan.windows) == (keys, by_customer, 2)
    assert plan.micros == [int(b.timestamp()) * 1_000_000 for b in plan.bounds]
    row = plan.row(1, "t1", tuple("eu" for _ in keys), Decimal("2.50"))
    assert (row.start, row.end, row.value) == (plan.bounds[1], plan.bounds[2], Decimal("2.5"))
    assert row.customer_id == ("t1" if by_customer else None)
    assert row.dimensions == dict.fromkeys(keys, "eu")


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (Aggregation.SUM, Decimal("6.5")),
        (Aggregation.COUNT, Decimal(4)),
        (Aggregation.MIN, Decimal("-1")),
        (Aggregation.MAX, Decimal("4")),
        (Aggregation.AVG, Decimal("1.625")),
        (Aggregation.LATEST, Decimal("2")),
        (Aggregation.UNIQUE_COUNT, Decimal(2)),
    ],
)
def test_each_aggregation_folds_a_window(aggregation: Aggregation, expected: Decimal) -> None:
    bucket = Bucket(values=[Decimal("1.5"), Decimal(4), Decimal(-1), Decimal(2)])
    for micros, event_id, value in (
        (30, "c", Decimal(4)),
        (50, "a", Decimal(2)),
        (50, "b", Decimal(2)),
    ):
        bucket.add_latest(micros, event_id, value)
    bucket.distinct.update({"u1", "u2"})
    assert FOLDS[aggregation](bucket) == expected


def test_latest_takes_the_greatest_time_and_a_tie_the_greatest_id() -> None:
    bucket = Bucket()
    bucket.add_latest(50, "e10", Decimal(1))
    bucket.add_latest(50, "e9", Decimal(2))  # same time, greater id (by code point): wins
    bucket.add_latest(50, "E99", Decimal(3))  # same time, smaller id ("E" < "e"): loses
    bucket.add_latest(40, "e99", Decimal(4))  # earlier time: loses
    assert FOLDS[Aggregation.LATEST](bucket) == Decimal(2)


def test_sums_are_exact_past_28_digits() -> None:
    big = Decimal("99999999999999999999.999999999999999999")
    assert FOLDS[Aggregation.SUM](Bucket(values=[big, big])) == Decimal(
        "199999999999999999999.999999999999999998"
    )


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [
        (Decimal(5), 3, Decimal("1.666666666666666667")),
        (Decimal(1), 8, Decimal("0.125")),
        (Decimal("0.000000000000000005"), 2, Decimal("0.000000000000000002")),  # half to even
        (Decimal("0.000000000000000015"), 2, Decimal("0.000000000000000008")),
        (Decimal("-7"), 2, Decimal("-3.5")),
        (
            Decimal("99999999999999999999999999999999999998"),
            2,
            Decimal("49999999999999999999999999999999999999"),
        ),
    ],
)
def test_an_average_keeps_18_places_rounded_half_to_even(
    total: Decimal, count: int, expected: Decimal
) -> None:
    assert canonical(average(total, count)) == expected
    assert average(total, count).as_tuple().exponent == -18


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("677.500", "677.5"),
        ("-0", "0"),
        ("-0.000", "0"),
        ("1E+2", "100"),
        ("100.000", "100"),
        ("0.000001000", "0.000001"),
        ("12345678901234567890123456789012345678", "12345678901234567890123456789012345678"),
        ("-2.50", "-2.5"),
    ],
)
def test_numbers_have_one_canonical_form(value: str, shown: str) -> None:
    assert str(canonical(Decimal(value))) == shown


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_a_caller_that_may_only_raise_usage_is_refused_meters_its_events_can_lower(
    aggregation: Aggregation,
) -> None:
    kind = aggregation.value

    @dataclass
    class Stored:
        id: str = "mtr_1"
        unique_dimension: str | None = None
        aggregation: str = kind

    sent = event("e", dimensions={"user": "u"})
    lowering = aggregation in {Aggregation.LATEST, Aggregation.MIN, Aggregation.AVG}
    reason = refusal(Stored(), sent, lowering_refused=True)
    assert (reason is not None) == lowering
    assert refusal(Stored(), sent) is None  # any other caller may
    if reason is not None:
        assert f"the {aggregation.value} meter for event_name='api_calls'" in reason
