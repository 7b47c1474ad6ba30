"""Memory-provider behaviour beyond the shared suite: calendars, folds, concurrency, dedupe."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering_core import MeterCreate, Metering, UsageEvent, ValidationError
from metering_core.memory import MemoryProvider
from metering_core.memory.store import CHUNK, Column
from tests.examples import examples


@pytest.fixture
def m() -> Iterator[Metering]:
    with Metering("memory", linger=0) as metering:
        yield metering


def ingest(m: Metering, *events: dict[str, object]) -> None:
    m.ingest_usage_events([{"event_name": "api_calls", "customer_id": "t1", **e} for e in events])
    assert m.flush().rejected == {}


def test_days_follow_local_midnight_across_a_dst_change(m: Metering) -> None:
    meter = m.create_meter(event_name="api_calls")
    # Paris moves to summer time on 2026-03-29: that day runs 23 hours, 23:00Z to 22:00Z
    ingest(
        m,
        {
            "value": 1,
            "timestamp": datetime(2026, 3, 28, 23, 30, tzinfo=UTC),
        },  # 00:30 on the 29th in Paris
        {
            "value": 2,
            "timestamp": datetime(2026, 3, 29, 21, 59, tzinfo=UTC),
        },  # 23:59 on the 29th in Paris
        {
            "value": 4,
            "timestamp": datetime(2026, 3, 29, 22, 0, tzinfo=UTC),
        },  # 00:00 on the 30th in Paris
    )
    usage = m.fetch_usage(
        meter.id,
        start=datetime(2026, 3, 28, 23, tzinfo=UTC),
        end=datetime(2026, 3, 30, 22, tzinfo=UTC),
        window="day",
        tz="Europe/Paris",
    )
    assert [(r.start, r.end, r.value) for r in usage.rows] == [
        (datetime(2026, 3, 28, 23, tzinfo=UTC), datetime(2026, 3, 29, 22, tzinfo=UTC), Decimal(3)),
        (datetime(2026, 3, 29, 22, tzinfo=UTC), datetime(2026, 3, 30, 22, tzinfo=UTC), Decimal(4)),
    ]


def test_months_follow_the_calendar_in_new_york(m: Metering) -> None:
    meter = m.create_meter(event_name="api_calls")
    ingest(
        m,
        {
            "value": 1,
            "timestamp": datetime(2026, 11, 1, 3, 59, tzinfo=UTC),
        },  # still October in New York
        {
            "value": 10,
            "timestamp": datetime(2026, 11, 1, 4, 0, tzinfo=UTC),
        },  # November 1st, 00:00 EDT
        {
            "value": 100,
            "timestamp": datetime(2026, 12, 1, 4, 59, tzinfo=UTC),
        },  # still November (EST)
    )
    usage = m.fetch_usage(
        meter.id,
        start=datetime(2026, 10, 1, 4, tzinfo=UTC),
        end=datetime(2026, 12, 1, 5, tzinfo=UTC),
        window="month",
        tz="America/New_York",
    )
    assert [(r.start, r.value) for r in usage.rows] == [
        (datetime(2026, 10, 1, 4, tzinfo=UTC), Decimal(1)),
        (datetime(2026, 11, 1, 4, tzinfo=UTC), Decimal(110)),
    ]
    assert usage.rows[1].end == datetime(2026, 12, 1, 5, tzinfo=UTC)  # EST midnight: 05:00Z


def test_rows_are_clipped_to_the_query_range(m: Metering) -> None:
    meter = m.create_meter(event_name="api_calls")
    ingest(
        m,
        {"value": 1, "timestamp": datetime(2026, 5, 1, 10, tzinfo=UTC)},
        {"value": 2, "timestamp": datetime(2026, 5, 2, 3, tzinfo=UTC)},
    )
    usage = m.fetch_usage(
        meter.id,
        start=datetime(2026, 5, 1, 9, tzinfo=UTC),
        end=datetime(2026, 5, 2, 4, tzinfo=UTC),
        window="day",
    )
    assert [(r.start, r.end) for r in usage.rows] == [
        (datetime(2026, 5, 1, 9, tzinfo=UTC), datetime(2026, 5, 2, tzinfo=UTC)),
        (datetime(2026, 5, 2, tzinfo=UTC), datetime(2026, 5, 2, 4, tzinfo=UTC)),
    ]


def test_latest_ties_go_to_the_greatest_id_and_avg_stays_exact(m: Metering) -> None:
    at = datetime(2026, 6, 1, tzinfo=UTC)
    latest = m.create_meter(event_name="seats", aggregation="latest")
    average = m.create_meter(event_name="latency", aggregation="avg")
    m.ingest_usage_events(
        [
            {"id": i, "event_name": "seats", "customer_id": "t", "value": v, "timestamp": at}
            for i, v in (("s2", 5), ("s3", 7), ("s1", 9))
        ]
    )
    m.ingest_usage_events(
        [
            {"event_name": "latency", "customer_id": "t", "value": v, "timestamp": at}
            for v in ("0.1", "0.2")
        ]
    )
    m.flush()
    window = {"start": at, "end": at + timedelta(hours=1)}
    assert m.fetch_usage(latest.id, **window).rows[0].value == 7
    assert m.fetch_usage(average.id, **window).rows[0].value == Decimal("0.15")


def test_a_latest_tie_across_customers_goes_to_the_greatest_id(m: Metering) -> None:
    at = datetime(2026, 6, 1, tzinfo=UTC)
    meter = m.create_meter(event_name="seats", aggregation="latest")
    # "a" is stored first, so a fold over customers meets "a" before "b": the tie must still
    # go to a's 6, the greatest id, though b's 4 is met last
    sent = (("x3", "a", 1, at - timedelta(minutes=1)), ("x2", "a", 6, at), ("x1", "b", 4, at))
    for event_id, customer, value, when in sent:
        m.ingest_usage_event(
            id=event_id, event_name="seats", customer_id=customer, value=value, timestamp=when
        )
    m.flush()
    assert m.fetch_usage(meter.id, start=at, end=at + timedelta(hours=1)).rows[0].value == 6


def test_a_bulk_cancel_reports_every_id_and_a_second_cancel_is_refused(m: Metering) -> None:
    at = datetime(2026, 6, 1, tzinfo=UTC)
    meter = m.create_meter(event_name="api_calls")
    ingest(m, *({"id": f"e{i}", "value": 1, "timestamp": at} for i in range(1000)))
    result = m.cancel_usage_events([*(f"e{i}" for i in range(0, 1000, 2)), "nope"])
    assert (len(result.cancelled), result.not_found, result.rejected) == (500, ["nope"], {})
    again = m.cancel_usage_events(["e0"])
    assert again.rejected == {"e0": "event 'e0' is already cancelled"}
    assert m.fetch_usage(meter.id, start=at, end=at + timedelta(hours=1)).total == 500


def test_unique_count_counts_distinct_users_per_group(m: Metering) -> None:
    meter = m.create_meter(
        event_name="mau", aggregation="unique_count", unique_dimension="user", dimensions=["user"]
    )
    at = datetime(2026, 6, 1, tzinfo=UTC)
    visits = [("t1", "ann"), ("t1", "ann"), ("t1", "bob"), ("t2", "ann")]
    m.ingest_usage_events(
        [
            {"event_name": "mau", "customer_id": c, "timestamp": at, "dimensions": {"user": u}}
            for c, u in visits
        ]
    )
    m.ingest_usage_event(event_name="mau", customer_id="t1", timestamp=at)
    report = m.flush()
    assert "needs dimension 'user'" in next(iter(report.rejected.values()))
    usage = m.fetch_usage(meter.id, start=at, end=at + timedelta(days=1), group_by=["customer_id"])
    assert [(r.customer_id, r.value) for r in usage.rows] == [("t1", 2), ("t2", 1)]


def test_group_by_an_undeclared_dimension_is_refused(m: Metering) -> None:
    meter = m.create_meter(event_name="api_calls", dimensions=["region"])
    with pytest.raises(ValidationError) as caught:
        m.fetch_usage(
            meter.id,
            start=datetime(2026, 1, 1, tzinfo=UTC),
            end=datetime(2026, 2, 1, tzinfo=UTC),
            group_by=["regoin"],
        )
    assert (caught.value.field, caught.value.value) == ("group_by", "regoin")


def test_a_deleted_meter_takes_its_events_with_it(m: Metering) -> None:
    meter = m.create_meter(event_name="api_calls")
    ingest(m, {"value": 5, "timestamp": datetime(2026, 1, 1, tzinfo=UTC)})
    m.delete_meter(meter.id)
    again = m.create_meter(event_name="api_calls")
    usage = m.fetch_usage(
        again.id, start=datetime(2025, 1, 1, tzinfo=UTC), end=datetime(2027, 1, 1, tzinfo=UTC)
    )
    assert usage.rows == []


def test_concurrent_threads_count_every_event_once(m: Metering) -> None:
    meter = m.create_meter(event_name="api_calls")
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def worker(n: int) -> None:
        for i in range(500):
            # every id is sent by two threads: only one may count
            m.ingest_usage_event(
                id=f"e{i}-{n // 2}", event_name="api_calls", customer_id="t1", value=1, timestamp=at
            )

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = m.flush()
    assert (len(report.accepted), len(report.duplicates)) == (2000, 2000)
    assert m.fetch_usage(meter.id, start=at, end=at + timedelta(days=1)).total == 2000


@settings(max_examples=examples(50), deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 20), st.integers(-5, 50), st.integers(0, 96)), max_size=20
        ),
        max_size=6,
    )
)
def test_usage_is_the_sum_of_each_ids_first_occurrence(
    batches: list[list[tuple[int, int, int]]],
) -> None:
    start = datetime(2026, 2, 1, tzinfo=UTC)
    expected: dict[str, int] = {}
    with Metering("memory", linger=0) as m:
        meter = m.create_meter(event_name="api_calls")
        for batch in batches:
            events = [
                UsageEvent(
                    id=f"e{i}",
                    event_name="api_calls",
                    customer_id="t",
                    value=v,
                    timestamp=start + timedelta(hours=h),
                )
                for i, v, h in batch
            ]
            for event in events:
                expected.setdefault(event.id, int(event.value))
            m.ingest_usage_events(events)
        m.flush()
        usage = m.fetch_usage(meter.id, start=start, end=start + timedelta(days=5), window="day")
    assert usage.total == sum(expected.values())


async def test_ingest_never_makes_the_event_loop_wait_on_a_busy_provider() -> None:
    """While another thread holds the provider (a long usage query does), ingestion moves
    to a worker thread: the loop keeps running, and the events land once it is free."""
    provider = MemoryProvider()
    await provider.create_meter(MeterCreate(event_name="api_calls"))
    held, release = threading.Event(), threading.Event()

    def long_query() -> None:
        with provider._lock:
            held.set()
            release.wait(5)

    busy = threading.Thread(target=long_query)
    busy.start()
    held.wait(5)
    ingest = asyncio.create_task(
        provider.ingest_usage_events([UsageEvent(id="e1", event_name="api_calls", customer_id="t")])
    )
    for _ in range(20):  # the loop keeps turning while the provider is busy
        await asyncio.sleep(0.005)
    assert not ingest.done()
    release.set()
    assert (await ingest).accepted == ["e1"]
    busy.join()
    again = await provider.ingest_usage_events(
        [UsageEvent(id="e1", event_name="api_calls", customer_id="t")]
    )
    assert again.duplicates == ["e1"]


@pytest.mark.parametrize(
    ("aggregation", "group_by"),
    [
        ("sum", []),
        ("sum", ["region"]),
        ("count", ["customer_id"]),
        ("max", []),
        ("latest", ["region"]),
        ("unique_count", []),
    ],
)
def test_ten_thousand_shuffled_events_match_a_brute_force_fold(
    aggregation: str, group_by: list[str]
) -> None:
    """Many events per series, ingested out of time order, queried from a start that falls
    inside the stored runs, then with cancellations spread through them: every row must
    equal a fold computed directly from the events."""
    rng = random.Random(12)
    base = datetime(2026, 3, 1, tzinfo=UTC)
    events = [
        UsageEvent(
            id=f"e{i}",
            event_name="calls",
            customer_id=rng.choice(["t1", "t2"]),
            value=rng.randint(0, 9),
            timestamp=base + timedelta(minutes=rng.randrange(72 * 60)),
            # a handful of shared dimension sets, and every 7th event one of its own
            dimensions={"region": rng.choice(["eu", "us", "ap"]), "user": f"u{rng.randrange(40)}"}
            | ({"trace": f"x{i}"} if i % 7 == 0 else {}),
        )
        for i in range(10_000)
    ]
    start, end = base + timedelta(hours=7), base + timedelta(hours=60)
    with Metering("memory", linger=0, max_queue=20_000) as m:
        meter = m.create_meter(
            event_name="calls",
            aggregation=aggregation,
            dimensions=["region", "user"],
            unique_dimension="user" if aggregation == "unique_count" else None,
        )
        m.ingest_usage_events(events)
        assert len(m.flush().accepted) == len(events)

        def check(cancelled: set[str]) -> None:
            usage = m.fetch_usage(meter.id, start=start, end=end, window="hour", group_by=group_by)
            rows = usage.rows
            got = {(r.start, r.customer_id, tuple(r.dimensions.items())): r.value for r in rows}
            assert got == _brute_force(events, cancelled, aggregation, group_by, start, end)

        check(set())
        cancelled = {f"e{i}" for i in range(0, 10_000, 37)}
        assert len(m.cancel_usage_events(sorted(cancelled)).cancelled) == len(cancelled)
        check(cancelled)


def _brute_force(
    events: list[UsageEvent],
    cancelled: set[str],
    aggregation: str,
    group_by: list[str],
    start: datetime,
    end: datetime,
) -> dict[tuple[datetime, str | None, tuple[tuple[str, str], ...]], Decimal]:
    """Hourly rows computed the obvious way, keyed like the test reads the answer."""
    groups: dict[tuple[datetime, str | None, tuple[tuple[str, str], ...]], list[UsageEvent]] = {}
    for event in events:
        if event.id in cancelled or not start <= event.timestamp < end:
            continue
        hour = event.timestamp.replace(minute=0, second=0, microsecond=0)
        customer = event.customer_id if "customer_id" in group_by else None
        dimensions = tuple((k, event.dimensions[k]) for k in group_by if k != "customer_id")
        groups.setdefault((hour, customer, dimensions), []).append(event)
    fold = {
        "sum": lambda es: sum((e.value for e in es), Decimal(0)),
        "count": lambda es: Decimal(len(es)),
        "max": lambda es: max(e.value for e in es),
        "latest": lambda es: max(es, key=lambda e: (e.timestamp, e.id)).value,
        "unique_count": lambda es: Decimal(len({e.dimensions["user"] for e in es})),
    }[aggregation]
    return {key: fold(members) for key, members in groups.items()}


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_a_column_reads_and_writes_like_a_list_and_refuses_positions_outside_it(
    size: int,
) -> None:
    """The memory provider's sealed-chunk column, at and around its chunk edges."""
    column: Column[int] = Column()
    for item in range(size // 2):
        column.append(item)
    column.extend(range(size // 2, size))
    mirror = list(range(size))
    for position in (0, CHUNK - 1, CHUNK, size - 1):
        if 0 <= position < size:
            column[position] = mirror[position] = -position - 1
    assert (list(column), len(column)) == (mirror, size)
    assert [column[p] for p in range(size)] == mirror
    for start in range(size + 1):
        for stop in range(start, size + 1, 7):
            assert list(column.between(start, stop)) == mirror[start:stop]
    for outside in (-1, size):
        with pytest.raises(IndexError):
            column[outside]
        with pytest.raises(IndexError):
            column[outside] = 0
    with pytest.raises(IndexError):
        column.between(0, size + 1)


def test_iter_usage_events_walks_every_page_of_both_facades(m: Metering) -> None:
    meter = m.create_meter(event_name="calls", dimensions=["region"])
    at = datetime(2026, 2, 1, tzinfo=UTC)
    sent = [
        UsageEvent(
            id=f"e{i:03}",
            event_name="calls",
            customer_id="acme",
            timestamp=at + timedelta(seconds=i // 3),  # ties of three: stored order
            dimensions={"region": "eu" if i % 4 else "us"},
        )
        for i in range(250)
    ]
    m.deliver_usage_events(sent)
    walked = m.iter_usage_events(
        meter.id, start=at, end=at + timedelta(days=1), filters={"region": ["eu"]}, page_size=7
    )
    assert [e.id for e in walked] == [e.id for e in sent if e.dimensions["region"] == "eu"]
    by_name = m.iter_usage_events(event_name="calls", start=at, end=at + timedelta(days=1))
    assert sum(1 for _ in by_name) == 250
