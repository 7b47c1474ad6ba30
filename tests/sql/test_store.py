"""The durable store: it remembers across processes, counts an event once across
processes, refuses what it cannot use with one line naming it, and answers as memory does."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError as PydanticValidationError

from metering_core import (
    AuthenticationError,
    ConfigurationError,
    EventQuery,
    IngestResult,
    MeterCreate,
    Metering,
    ProviderUnavailableError,
    StoredEvent,
    UsageEvent,
    UsageQuery,
    UsageRow,
    ValidationError,
)
from metering_core.export import ExportFormat, piece
from metering_core.memory import MemoryProvider
from metering_core.sql import SqlSettings
from metering_core.sql.provider import SqlProvider
from metering_core.sql.rows import Trusted
from metering_core.sql.store import _config, schema_revisions
from tests.examples import examples
from tests.stores import new_database

START = datetime(2026, 3, 1, tzinfo=UTC)


def metering(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env["XDG_DATA_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "metering_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_what_one_command_writes_the_next_one_reads(tmp_path: Path) -> None:
    created = metering("meters", "create", "api_calls", home=tmp_path)
    assert created.returncode == 0, created.stderr
    assert "using 'sql' on" in created.stderr
    rows = tmp_path / "usage.jsonl"
    rows.write_text(
        '{"id": "a", "event_name": "api_calls", "customer_id": "t1", "value": 2,'
        ' "timestamp": "2026-03-01T10:00:00Z"}\n'
        '{"id": "b", "event_name": "api_calls", "customer_id": "t1", "value": 3,'
        ' "timestamp": "2026-03-01T11:00:00Z"}\n'
    )
    assert metering("ingest", str(rows), home=tmp_path).returncode == 0
    again = metering("ingest", str(rows), home=tmp_path)  # a rerun counts nothing twice
    assert "duplicates 2" in again.stdout
    listed = metering("meters", "list", home=tmp_path).stdout
    assert "api_calls" in listed
    meter_id = next(word for word in listed.split() if word.startswith("mtr_"))
    assert len(meter_id) == len("mtr_") + 24  # whole, not cut to the terminal
    path = metering("db", "path", home=tmp_path).stdout.strip()
    assert path == str(tmp_path / "metering" / "metering.db")
    assert metering("db", "current", home=tmp_path).stdout.startswith(schema_revisions()[0])


async def _usage_total(provider: SqlProvider, meter_id: str) -> Decimal:
    usage = await provider.fetch_usage(
        UsageQuery(meter_id=meter_id, start=START, end=START + timedelta(days=1))
    )
    return usage.total


def test_a_restarted_store_answers_the_same_totals(sqlite_url: str) -> None:
    async def first() -> str:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        meter = await provider.create_meter(MeterCreate(event_name="api_calls"))
        events = [
            UsageEvent(
                id=f"e{i}", event_name="api_calls", customer_id="t1", value=i, timestamp=START
            )
            for i in range(10)
        ]
        await provider.ingest_usage_events(events)
        await provider.aclose()
        return meter.id

    async def second(meter_id: str) -> Decimal:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        try:
            return await _usage_total(provider, meter_id)
        finally:
            await provider.aclose()

    meter_id = asyncio.run(first())
    assert asyncio.run(second(meter_id)) == Decimal(45)


def test_two_processes_sending_overlapping_events_count_each_once(postgres_url: str) -> None:
    """Two providers (two engines, as two processes have) race over the same ids."""

    async def scenario() -> tuple[list[str], list[str], Decimal]:
        a, b = (
            SqlProvider(SqlSettings(url=postgres_url)),
            SqlProvider(SqlSettings(url=postgres_url)),
        )
        meter = await a.create_meter(MeterCreate(event_name="api_calls"))
        events = [
            UsageEvent(id=f"e{i}", event_name="api_calls", customer_id="t1", timestamp=START)
            for i in range(2000)
        ]
        batches = [events[i : i + 250] for i in range(0, 2000, 250)]
        results = await asyncio.gather(
            *(a.ingest_usage_events(batch) for batch in batches),
            *(b.ingest_usage_events(batch) for batch in reversed(batches)),
        )
        accepted = [i for result in results for i in result.accepted]
        duplicates = [i for result in results for i in result.duplicates]
        total = await _usage_total(b, meter.id)
        await a.aclose()
        await b.aclose()
        return accepted, duplicates, total

    accepted, duplicates, total = asyncio.run(scenario())
    assert sorted(accepted) == sorted(f"e{i}" for i in range(2000))
    assert sorted(duplicates) == sorted(accepted)
    assert total == Decimal(2000)


def test_a_database_newer_than_the_code_is_refused(sqlite_url: str) -> None:
    import sqlite3

    async def touch() -> None:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        await provider.create_meter(MeterCreate(event_name="api_calls"))
        await provider.aclose()

    asyncio.run(touch())
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_future'")

    async def reopen() -> None:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        try:
            await provider.fetch_all_meters()
        finally:
            await provider.aclose()

    with pytest.raises(ConfigurationError, match="'9999_future', newer than this version"):
        asyncio.run(reopen())


def test_a_store_from_before_rollups_is_upgraded_and_answers_the_same(any_url: str) -> None:
    """A store written by revision 0001 (no rollups) gets them built from its events when
    upgraded: embedded SQLite on first use, PostgreSQL by `metering db upgrade`."""
    events = [
        UsageEvent(
            id=f"e{i}",
            event_name="api_calls",
            customer_id=f"t{i % 3}",
            value=Decimal(i) / 4,
            timestamp=START + timedelta(minutes=37 * i),
            dimensions={"region": ("eu", "us")[i % 2]},
        )
        for i in range(200)
    ]
    query = {"start": START, "end": START + timedelta(days=7), "window": "hour"}

    async def write() -> list[UsageRow]:
        provider = SqlProvider(SqlSettings(url=any_url))
        meter = await provider.create_meter(
            MeterCreate(event_name="api_calls", dimensions=["region"])
        )
        await provider.ingest_usage_events(events)
        await provider.cancel_usage_events(["e3", "e50"])
        usage = await provider.fetch_usage(
            UsageQuery(meter_id=meter.id, group_by=["region"], **query)
        )
        async with provider._transaction() as connection:  # back to revision 0001
            await connection.run_sync(lambda c: command.downgrade(_config(c), "0001"))
        await provider.aclose()
        return usage.rows

    async def read(upgrade: bool) -> list[UsageRow]:
        provider = SqlProvider(SqlSettings(url=any_url))
        try:
            if upgrade:
                with pytest.raises(ConfigurationError, match="run `metering db upgrade`"):
                    await provider.fetch_all_meters()
                await provider.upgrade_schema()
            [meter] = (await provider.fetch_all_meters()).items
            usage = await provider.fetch_usage(
                UsageQuery(meter_id=meter.id, group_by=["region"], **query)
            )
            return usage.rows
        finally:
            await provider.aclose()

    before = asyncio.run(write())
    assert len(before) > 100
    assert asyncio.run(read(upgrade=any_url.startswith("postgresql"))) == before


def test_an_id_repeated_across_meters_in_one_batch_counts_only_where_it_was_stored(
    any_url: str,
) -> None:
    """The first copy of an id is stored (for a max meter); the second, for a sum meter,
    is a duplicate and must not reach that meter's rollups either."""

    async def scenario(provider: Any) -> list[Decimal]:
        peak = await provider.create_meter(MeterCreate(event_name="peak", aggregation="max"))
        total = await provider.create_meter(MeterCreate(event_name="calls"))
        sent = [
            UsageEvent(id="x", event_name="peak", customer_id="t", value=5, timestamp=START),
            UsageEvent(id="x", event_name="calls", customer_id="t", value=7, timestamp=START),
        ]
        await provider.ingest_usage_events(sent)
        span = {"start": START, "end": START + timedelta(hours=1)}
        return [
            (await provider.fetch_usage(UsageQuery(meter_id=m.id, **span))).total
            for m in (peak, total)
        ]

    memory, store = asyncio.run(_both(any_url, scenario))
    assert store == memory == [Decimal(5), Decimal(0)]


def test_a_batch_of_thousands_with_repeats_far_apart_answers_as_memory_does(
    any_url: str,
) -> None:
    """One batch larger than one INSERT on SQLite (500 rows), whose ids repeat across
    those parts and repeat ids of an earlier batch, for two meters (one rolled up, one
    not), some refused: the answer per id and the totals are memory's."""

    def event(i: int, name: str = "calls") -> UsageEvent:
        return UsageEvent(
            id=f"e{i % 1100}",  # e0..e199 come twice, 1,100 positions apart
            event_name=name,
            customer_id=f"t{i % 3}",
            value=Decimal(i % 9) / 4,
            timestamp=START + timedelta(minutes=i % 240),
            dimensions={"region": ("eu", "us")[i % 2]},
        )

    async def scenario(provider: Any) -> tuple[Any, ...]:
        calls = await provider.create_meter(MeterCreate(event_name="calls", dimensions=["region"]))
        peak = await provider.create_meter(MeterCreate(event_name="peak", aggregation="max"))
        earlier = await provider.ingest_batch([event(i) for i in range(1000, 1050)])
        batch = [event(i, ("calls", "peak", "nobody")[i % 5 % 3]) for i in range(1300)]
        answer = await provider.ingest_batch(batch)
        span = {"start": START, "end": START + timedelta(hours=4), "window": "hour"}
        usage = [
            (await provider.fetch_usage(UsageQuery(meter_id=m.id, **span, group_by=g))).rows
            for m, g in ((calls, ["region", "customer_id"]), (calls, []), (peak, ["customer_id"]))
        ]
        return earlier.accepted, answer.accepted, answer.duplicates, answer.rejected, usage

    memory, store = asyncio.run(_both(any_url, scenario))
    assert store == memory
    # 1,100 ids: 50 sent before, 210 for no meter (every fifth); of the 200 sent twice
    # in the batch, 160 were stored the first time
    assert [len(part) for part in memory[1:4]] == [840, 50 + 160, 210]


def test_an_id_sent_refused_and_valid_in_one_batch_is_answered_as_on_memory(
    any_url: str,
) -> None:
    """A refused copy before the valid one is rejected, and the valid one accepted; after
    a stored copy, a refused one is a duplicate: per copy, in batch order."""

    async def scenario(provider: Any) -> list[tuple[list[str], list[str], list[str]]]:
        await provider.create_meter(MeterCreate(event_name="calls"))
        answers = []
        for names in (("nobody", "calls"), ("calls", "nobody")):
            sent = [
                UsageEvent(id=names[0], event_name=name, customer_id="t", timestamp=START)
                for name in names
            ]
            answer = await provider.ingest_batch(sent)
            answers.append((answer.accepted, answer.duplicates, list(answer.rejected)))
        return answers

    memory, store = asyncio.run(_both(any_url, scenario))
    assert store == memory == [(["nobody"], [], ["nobody"]), (["calls"], ["calls"], [])]


def test_an_id_stored_before_and_sent_again_for_no_meter_is_a_duplicate(any_url: str) -> None:
    """An id the store holds is a duplicate whatever its copy now names: sent again for an
    event name with no meter, or after its own meter was deleted. An id it does not hold,
    sent for no meter, is rejected. (On PostgreSQL the ids refused are looked up apart
    from the write, and only when a batch has any.)"""

    async def scenario(provider: Any) -> list[tuple[list[str], list[str], list[str]]]:
        meter = await provider.create_meter(MeterCreate(event_name="calls"))
        await provider.ingest_batch(
            [UsageEvent(id=i, event_name="calls", customer_id="t", timestamp=START) for i in "ab"]
        )

        async def send(batch: list[tuple[str, str]]) -> tuple[list[str], list[str], list[str]]:
            answer = await provider.ingest_batch(
                [
                    UsageEvent(id=i, event_name=name, customer_id="t", timestamp=START)
                    for i, name in batch
                ]
            )
            return answer.accepted, answer.duplicates, sorted(answer.rejected)

        first = await send([("a", "nobody"), ("new", "nobody"), ("c", "calls")])
        await provider.delete_meter(meter.id)
        return [first, await send([("b", "calls"), ("d", "calls")])]

    memory, store = asyncio.run(_both(any_url, scenario))
    assert store == memory == [(["c"], ["a"], ["new"]), ([], ["b"], ["d"])]


def test_dimensions_of_any_size_are_rolled_up(any_url: str) -> None:
    """A rollup is keyed by a digest of its dimensions, so a 6,000-character value fits
    the index like any other, and its neighbours in the batch are not refused with it."""

    async def scenario(provider: Any) -> tuple[list[str], Decimal]:
        meter = await provider.create_meter(MeterCreate(event_name="calls", dimensions=["note"]))
        sent = [
            UsageEvent(
                id="big",
                event_name="calls",
                customer_id="t",
                timestamp=START,
                dimensions={"note": "x" * 6000},
            ),
            UsageEvent(id="small", event_name="calls", customer_id="t", timestamp=START),
        ]
        accepted = (await provider.ingest_usage_events(sent)).accepted
        span = {"start": START, "end": START + timedelta(hours=1), "group_by": ["note"]}
        return accepted, (await provider.fetch_usage(UsageQuery(meter_id=meter.id, **span))).total

    memory, store = asyncio.run(_both(any_url, scenario))
    assert store == memory == (["big", "small"], Decimal(2))


def test_rollups_hold_one_row_per_quarter_hour_and_dimensions_however_events_arrive(
    any_url: str,
) -> None:
    """A backfill scattered over time, in many batches, with dimensions in any key order,
    then cancellations: the rollups stay one row per (meter, quarter hour, dimensions)."""
    regions = [{"region": "eu", "tier": "a"}, {"tier": "a", "region": "eu"}, {"region": "us"}]
    events = [
        UsageEvent(
            id=f"e{i}",
            event_name="api_calls",
            customer_id=f"t{i % 7}",
            timestamp=START + timedelta(minutes=(i * 37) % 45),  # three quarter hours
            dimensions=regions[i % 3],
        )
        for i in range(300)
    ]

    async def scenario() -> list[int]:
        provider = SqlProvider(SqlSettings(url=any_url))
        await provider.create_meter(MeterCreate(event_name="api_calls", aggregation="count"))
        for offset in range(0, 300, 7):
            await provider.ingest_usage_events(events[offset : offset + 7])
        counts = []
        async with provider._transaction() as connection:
            counts.append(await connection.scalar(sa.text("SELECT count(*) FROM rollups")))
        await provider.cancel_usage_events([f"e{i}" for i in range(0, 300, 5)])
        async with provider._transaction() as connection:
            counts.append(await connection.scalar(sa.text("SELECT count(*) FROM rollups")))
            counts.append(await connection.scalar(sa.text("SELECT sum(count) FROM rollups")))
        await provider.aclose()
        return counts

    assert asyncio.run(scenario()) == [3 * 2, 3 * 2, 300 - 60]


def _open(url: str) -> None:
    async def run() -> None:
        provider = SqlProvider(SqlSettings(url=url))
        try:
            await provider.fetch_all_meters()
        finally:
            await provider.aclose()

    asyncio.run(run())


def test_an_unreachable_store_is_one_line_with_the_password_masked() -> None:
    with pytest.raises(ProviderUnavailableError) as caught:
        _open("postgresql://billing:s3cret-pw@127.0.0.1:1/metering")
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert "billing:***@127.0.0.1:1" in message
    assert "\n" not in message


def test_a_missing_database_and_refused_credentials_are_not_retried(postgres_server: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot be used"):
        _open(f"{postgres_server}/no_such_database")
    with pytest.raises((AuthenticationError, ConfigurationError)) as caught:
        _open(postgres_server.replace("postgres@", "nobody:pw@") + "/postgres")
    assert "pw@" not in str(caught.value)


def test_a_corrupt_sqlite_file_is_a_configuration_error_and_is_left_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metering.db"
    path.write_bytes(b"definitely not sqlite" * 200)
    with pytest.raises(ConfigurationError, match=f"store sqlite.*{path.name}.* cannot be used"):
        _open(f"sqlite:///{path}")
    assert path.read_bytes() == b"definitely not sqlite" * 200


def test_a_full_disk_is_retryable_and_writes_nothing_until_there_is_room(
    sqlite_url: str,
) -> None:
    """SQLite out of room mid-batch (its page limit, as a full volume would be): the batch
    is refused as retryable, nothing of it is stored, and the retry counts it once."""
    sent = [
        UsageEvent(
            id=f"e{i}",
            event_name="calls",
            customer_id=f"t{i % 50}",
            value=1,
            timestamp=START + timedelta(seconds=i),
            dimensions={"note": f"{i:x}" * 20},
        )
        for i in range(3000)
    ]

    async def scenario() -> tuple[str, Decimal, list[str], Decimal]:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        meter = await provider.create_meter(MeterCreate(event_name="calls", dimensions=["note"]))
        span = UsageQuery(meter_id=meter.id, start=START, end=START + timedelta(days=1))
        async with provider._transaction() as connection:  # the pool's one connection
            pages = await connection.scalar(sa.text("PRAGMA page_count"))
            await connection.exec_driver_sql(f"PRAGMA max_page_count = {pages + 3}")
        with pytest.raises(ProviderUnavailableError) as caught:
            await provider.ingest_batch(sent)
        before = (await provider.fetch_usage(span)).total
        async with provider._transaction() as connection:
            await connection.exec_driver_sql("PRAGMA max_page_count = 1073741823")
        accepted = (await provider.ingest_batch(sent)).accepted
        after = (await provider.fetch_usage(span)).total
        await provider.aclose()
        return str(caught.value), before, accepted, after

    message, before, accepted, after = asyncio.run(scenario())
    assert re.search(r"store sqlite.* failed to write; it can be retried: .*full", message)
    assert (before, len(accepted), after) == (0, 3000, 3000)


AGGREGATIONS = ["sum", "count", "min", "max", "avg", "latest", "unique_count"]


def event_rows(minutes: int) -> st.SearchStrategy[list[tuple[int, str, Decimal, str, str]]]:
    """Events at a minute offset below `minutes`: customer, value, region, user."""
    return st.lists(
        st.tuples(
            st.integers(0, minutes - 1),
            st.sampled_from(["t1", "t2", "t3"]),
            st.decimals(min_value=-50, max_value=500, places=2, allow_nan=False),
            st.sampled_from(["eu", "us", ""]),
            st.sampled_from(["u1", "u2", "u3", "u4"]),
        ),
        min_size=1,
        max_size=60,
    )


FILTERS = st.sampled_from(
    [{}, {"region": ("eu",)}, {"region": ("eu", "us")}, {"region": ("us",), "user": ("u1", "u2")}]
)


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'metering.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _answers(
    url: str,
    rows: list[tuple[int, str, Decimal, str, str]],
    origin: datetime,
    aggregation: str,
    cancel: set[int],
    **query: Any,
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The rows memory and the store at `url` answer for the same events and cancellations
    (one store serves many examples: names and ids are this call's own)."""
    run = uuid.uuid4().hex[:8]
    meter = MeterCreate(
        event_name=f"calls_{run}",
        aggregation=aggregation,
        dimensions=["region", "user"],
        unique_dimension="user" if aggregation == "unique_count" else None,
    )
    events = [
        UsageEvent(
            id=f"{run}-e{i}",
            event_name=meter.event_name,
            customer_id=who,
            value=value,
            timestamp=origin + timedelta(minutes=minute),
            dimensions={"user": user, **({"region": region} if region else {})},
        )
        for i, (minute, who, value, region, user) in enumerate(rows)
    ]

    async def answer(provider: MemoryProvider | SqlProvider) -> list[tuple[object, ...]]:
        created = await provider.create_meter(meter)
        await provider.ingest_usage_events(events[: len(events) // 2])
        await provider.ingest_usage_events(events)  # the second half, and duplicates
        await provider.cancel_usage_events([f"{run}-e{i}" for i in cancel])
        usage = await provider.fetch_usage(UsageQuery(meter_id=created.id, **query))
        await provider.aclose()
        return [(r.start, r.end, r.customer_id, r.dimensions, r.value) for r in usage.rows]

    return asyncio.run(answer(MemoryProvider())), asyncio.run(
        answer(SqlProvider(SqlSettings(url=url)))
    )


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=event_rows(70 * 24 * 60),  # ten weeks
    origin=st.sampled_from([START, datetime(1969, 12, 20, tzinfo=UTC)]),  # hours before 1970
    aggregation=st.sampled_from(AGGREGATIONS),
    window=st.sampled_from([None, "hour", "day", "month"]),
    tz=st.sampled_from(
        ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
    ),
    group_by=st.sampled_from([(), ("customer_id",), ("region",), ("customer_id", "region")]),
    customer=st.sampled_from([None, "t2"]),
    start_minute=st.sampled_from([300, 301]),  # on an hour, or not
    cancel=st.sets(st.integers(0, 59), max_size=5),
    filters=FILTERS,
    customers=st.sampled_from([(), ("t1", "t3"), ("t2",)]),
)
def test_answers_are_the_memory_providers_for_the_same_events(
    any_url: str,
    rows: list[tuple[int, str, Decimal, str, str]],
    origin: datetime,
    aggregation: str,
    window: str | None,
    tz: str,
    group_by: tuple[str, ...],
    customer: str | None,
    start_minute: int,
    cancel: set[int],
    filters: dict[str, tuple[str, ...]],
    customers: tuple[str, ...],
) -> None:
    """Every aggregation, window, zone, grouping, filter and list of customers, with
    cancellations, before and after 1970: the store answers as memory does."""
    memory, store = _answers(
        any_url,
        rows,
        origin,
        aggregation,
        cancel,
        customer_id=customer,
        start=origin + timedelta(minutes=start_minute),
        end=origin + timedelta(days=65),
        window=window,
        group_by=group_by,
        tz=tz,
        filters=filters,
        customer_ids=customers,
    )
    assert store == memory


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=event_rows(3 * 24 * 60),  # three days
    origin=st.sampled_from([START, datetime(1969, 12, 31, 6, tzinfo=UTC)]),  # across 1970
    aggregation=st.sampled_from(["sum", "count", "avg"]),
    window=st.sampled_from([None, "hour", "day", "month"]),
    tz=st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kathmandu"]),
    group_by=st.sampled_from([(), ("region",)]),
    quarters=st.tuples(st.integers(0, 96), st.integers(1, 96 * 40)),
    cancel=st.sets(st.integers(0, 59), max_size=10),
    filters=FILTERS,
)
def test_queries_the_rollups_answer_are_the_memory_providers_too(
    any_url: str,
    rows: list[tuple[int, str, Decimal, str, str]],
    origin: datetime,
    aggregation: str,
    window: str | None,
    tz: str,
    group_by: tuple[str, ...],
    quarters: tuple[int, int],
    cancel: set[int],
    filters: dict[str, tuple[str, ...]],
) -> None:
    """Across customers over whole quarter hours (any zone: Kathmandu is 5:45 from UTC),
    sum, count and avg come from the rollups: still memory's answers, with cancellations,
    duplicates and times before 1970."""
    start = origin + timedelta(minutes=15 * quarters[0])
    memory, store = _answers(
        any_url,
        rows,
        origin,
        aggregation,
        cancel,
        start=start,
        end=start + timedelta(minutes=15 * quarters[1]),
        window=window,
        group_by=group_by,
        tz=tz,
        filters=filters,
    )
    assert store == memory


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=event_rows(3 * 24 * 60),  # three days
    origin=st.sampled_from([START, datetime(1969, 12, 31, 6, tzinfo=UTC)]),  # across 1970
    aggregation=st.sampled_from(AGGREGATIONS),
    tz=st.sampled_from(["UTC", "Asia/Kathmandu", "Europe/Amsterdam"]),
    minutes=st.tuples(st.integers(0, 600), st.integers(1, 5000)),
    cancel=st.sets(st.integers(0, 59), max_size=10),
    filters=FILTERS,
)
def test_minute_windows_are_the_memory_providers(
    any_url: str,
    rows: list[tuple[int, str, Decimal, str, str]],
    origin: datetime,
    aggregation: str,
    tz: str,
    minutes: tuple[int, int],
    cancel: set[int],
    filters: dict[str, tuple[str, ...]],
) -> None:
    """Minute windows over any range (seconds off the minute too), in zones whose offset
    is not whole hours: the store answers as memory does."""
    start = origin + timedelta(minutes=minutes[0], seconds=minutes[0] % 7)
    memory, store = _answers(
        any_url,
        rows,
        origin,
        aggregation,
        cancel,
        start=start,
        end=start + timedelta(minutes=minutes[1]),
        window="minute",
        group_by=("region",),
        tz=tz,
        filters=filters,
    )
    assert store == memory


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=event_rows(3 * 24 * 60),
    cancel=st.sets(st.integers(0, 59), max_size=10),
    filters=FILTERS,
    customer=st.sampled_from([None, "t2"]),
    include_cancelled=st.booleans(),
    limit=st.integers(1, 25),
    span=st.tuples(st.integers(0, 3 * 24 * 60), st.integers(1, 3 * 24 * 60)),
)
def test_event_listings_are_the_memory_providers(
    any_url: str,
    rows: list[tuple[int, str, Decimal, str, str]],
    cancel: set[int],
    filters: dict[str, tuple[str, ...]],
    customer: str | None,
    include_cancelled: bool,
    limit: int,
    span: tuple[int, int],
) -> None:
    """Page by page, with filters, a customer, cancelled events or not: the store lists
    the same events as memory, in the same order, with the same fields."""
    memory, store = _listings(
        any_url,
        rows,
        cancel,
        customer_id=customer,
        start=START + timedelta(minutes=span[0]),
        end=START + timedelta(minutes=span[0] + span[1]),
        filters=filters,
        include_cancelled=include_cancelled,
        limit=limit,
    )
    assert store == memory


def _listings(
    url: str,
    rows: list[tuple[int, str, Decimal, str, str]],
    cancel: set[int],
    **query: Any,
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The pages memory and the store at `url` list for the same events."""
    run = uuid.uuid4().hex[:8]
    meter = MeterCreate(event_name=f"calls_{run}", dimensions=["region", "user"])
    events = [
        UsageEvent(
            id=f"{run}-e{i}",
            event_name=meter.event_name,
            customer_id=who,
            value=value,
            timestamp=START + timedelta(minutes=minute),
            dimensions={"user": user, **({"region": region} if region else {})},
        )
        for i, (minute, who, value, region, user) in enumerate(rows)
    ]

    async def pages(provider: MemoryProvider | SqlProvider) -> list[tuple[object, ...]]:
        created = await provider.create_meter(meter)
        await provider.ingest_usage_events(events[: len(events) // 2])
        await provider.ingest_usage_events(events)
        await provider.cancel_usage_events([f"{run}-e{i}" for i in cancel])
        found: list[tuple[object, ...]] = []
        cursor = None
        while True:
            page = await provider.list_usage_events(
                EventQuery(meter_id=created.id, cursor=cursor, **query)
            )
            found.append(tuple(e.model_dump(exclude={"ingested_at"}) for e in page.items))
            found.append((page.next_cursor,))  # the same events, the same cursors
            cursor = page.next_cursor
            if cursor is None:
                await provider.aclose()
                return found

    return asyncio.run(pages(MemoryProvider())), asyncio.run(
        pages(SqlProvider(SqlSettings(url=url)))
    )


def test_listed_events_are_the_models_validation_would_make(any_url: str) -> None:
    """The store builds listed events without validating them (its own rows, trusted):
    each must be exactly the model validating its fields makes, frozen as that is."""

    async def listed() -> list[StoredEvent]:
        provider = SqlProvider(SqlSettings(url=any_url))
        try:
            meter = await provider.create_meter(MeterCreate(event_name="calls"))
            await provider.ingest_usage_events(
                [
                    UsageEvent(
                        event_name="calls",
                        customer_id="t1",
                        value=Decimal("2.50"),
                        timestamp=START + timedelta(seconds=n),
                        dimensions={"region": "eu"} if n else {},
                    )
                    for n in range(3)
                ]
            )
            end = START + timedelta(hours=1)
            page = await provider.list_usage_events(
                EventQuery(meter_id=meter.id, start=START, end=end)
            )
            return page.items
        finally:
            await provider.aclose()

    items = asyncio.run(listed())
    assert len(items) == 3
    for item in items:
        validated = StoredEvent.model_validate(item.model_dump())
        assert item == validated
        assert item.model_dump_json() == validated.model_dump_json()
        assert item.model_fields_set == validated.model_fields_set
        assert item.model_copy(update={"cancelled": True}).cancelled
        with pytest.raises(PydanticValidationError):
            item.cancelled = True  # type: ignore[misc]


async def _both(url: str, scenario: Any) -> tuple[Any, Any]:
    """The same scenario on memory and on the store at `url`."""
    memory, store = MemoryProvider(), SqlProvider(SqlSettings(url=url))
    try:
        return await scenario(memory), await scenario(store)
    finally:
        await store.aclose()


def test_a_new_meter_never_inherits_a_deleted_meters_events(any_url: str) -> None:
    async def scenario(provider: Any) -> Decimal:
        old = await provider.create_meter(MeterCreate(event_name="storage_gb"))
        await provider.ingest_usage_events(
            [UsageEvent(event_name="storage_gb", customer_id="t", value=100, timestamp=START)] * 1
        )
        await provider.delete_meter(old.id)
        new = await provider.create_meter(MeterCreate(event_name="api_calls"))
        return (
            await provider.fetch_usage(
                UsageQuery(meter_id=new.id, start=START, end=START + timedelta(days=1))
            )
        ).total

    assert asyncio.run(_both(any_url, scenario)) == (Decimal(0), Decimal(0))


@pytest.mark.parametrize("key", ["é", 'a"b', "b\\s", "x.y"])
def test_any_dimension_key_groups_and_counts_as_on_memory(any_url: str, key: str) -> None:
    async def scenario(provider: Any) -> tuple[object, ...]:
        grouped = await provider.create_meter(MeterCreate(event_name="g", dimensions=[key]))
        unique = await provider.create_meter(
            MeterCreate(event_name="u", aggregation="unique_count", unique_dimension=key)
        )
        await provider.ingest_usage_events(
            [
                UsageEvent(event_name=name, customer_id="t", timestamp=START, dimensions={key: v})
                for name in ("g", "u")
                for v in ("ü", "ü", "ß")
            ]
        )
        span = {"start": START, "end": START + timedelta(days=1)}
        rows = (
            await provider.fetch_usage(UsageQuery(meter_id=grouped.id, group_by=(key,), **span))
        ).rows
        distinct = (await provider.fetch_usage(UsageQuery(meter_id=unique.id, **span))).total
        return tuple((r.dimensions[key], r.value) for r in rows), distinct

    memory, store = asyncio.run(_both(any_url, scenario))
    assert store == memory == (((("ß", Decimal(1)), ("ü", Decimal(2)))), Decimal(2))


TIED_IDS = ("tie-Z", "tie-a", "tie-z", "tie-é")
"""In code point order (UTF-8's bytes); an en-US collation sorts them a, é, z, Z."""


@pytest.fixture(params=["sqlite", "postgres", "postgres-en-US"])
def collated_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store whose database sorts text by bytes (SQLite, the private server's C locale),
    or by a language's rules, as production PostgreSQL databases are often made."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'metering.db'}"
    server = request.getfixturevalue("postgres_server")
    return new_database(server, icu_locale="en-US" if request.param.endswith("US") else None)


@pytest.mark.parametrize("batched", [True, False], ids=["one-batch", "one-by-one"])
@pytest.mark.parametrize(
    "sent",
    [TIED_IDS, TIED_IDS[::-1], ("tie-z", "tie-é", "tie-Z", "tie-a")],
    ids=["code-points", "reversed", "shuffled"],
)
def test_a_latest_tie_goes_to_the_greatest_id_whatever_order_it_arrives_in(
    collated_url: str, sent: tuple[str, ...], batched: bool
) -> None:
    """So every copy of the events (an export loaded elsewhere, a mirror fed out of order,
    a batch retried after a later one) bills the same value."""

    async def scenario(provider: Any) -> tuple[Decimal, ...]:
        meter = await provider.create_meter(MeterCreate(event_name="seats", aggregation="latest"))
        tied = [
            UsageEvent(
                id=event_id,
                event_name="seats",
                customer_id=f"t{n % 2}",
                value=TIED_IDS.index(event_id),
                timestamp=START,
            )
            for n, event_id in enumerate(sent)
        ]
        earlier = UsageEvent(  # a greater id a microsecond before does not tie
            id="tie-ü",
            event_name="seats",
            customer_id="t0",
            value=99,
            timestamp=START - timedelta(microseconds=1),
        )
        for batch in [[earlier, *tied]] if batched else [[earlier], *([e] for e in tied)]:
            await provider.ingest_usage_events(batch)
        span = {"start": START - timedelta(hours=1), "end": START + timedelta(hours=1)}
        everyone = await provider.fetch_usage(UsageQuery(meter_id=meter.id, **span))
        each = await provider.fetch_usage(
            UsageQuery(meter_id=meter.id, group_by=("customer_id",), **span)
        )
        return everyone.total, *(row.value for row in each.rows)

    # t0 holds tie-Z and tie-z, or tie-é and tie-a, as the order sent deals them
    customers = {TIED_IDS.index(i) for i in sent[0::2]}, {TIED_IDS.index(i) for i in sent[1::2]}
    expected = (Decimal(3), *(Decimal(max(values)) for values in customers))
    assert asyncio.run(_both(collated_url, scenario)) == (expected, expected)


def test_events_of_one_time_are_listed_by_code_point_a_page_at_a_time_whatever_the_collation(
    collated_url: str,
) -> None:
    """A listing's order, and the cursor that resumes it, are the ids' code points on every
    store: an en-US database sorts them a, é, z, Z, and paging by that order against a
    cursor compared by bytes would skip or repeat events (mutation testing: no test had
    a database of another collation)."""

    async def scenario(provider: Any) -> list[str]:
        meter = await provider.create_meter(MeterCreate(event_name="seats"))
        await provider.ingest_usage_events(
            [
                UsageEvent(id=event_id, event_name="seats", customer_id="t", timestamp=START)
                for event_id in ("tie-z", "tie-é", "tie-Z", "tie-a")
            ]
        )
        listed: list[str] = []
        cursor = None
        for _ in range(10):
            page = await provider.list_usage_events(
                EventQuery(
                    meter_id=meter.id,
                    start=START,
                    end=START + timedelta(seconds=1),
                    limit=1,
                    cursor=cursor,
                )
            )
            listed += [event.id for event in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        return listed

    assert asyncio.run(_both(collated_url, scenario)) == (list(TIED_IDS), list(TIED_IDS))


def test_sums_of_38_digit_values_are_exact_everywhere(any_url: str) -> None:
    big = Decimal("12345678901234567890.123456789012345678")

    async def scenario(provider: Any) -> Decimal:
        meter = await provider.create_meter(MeterCreate(event_name="bytes"))
        await provider.ingest_usage_events(
            [
                UsageEvent(event_name="bytes", customer_id="t", value=v, timestamp=START)
                for v in (big, Decimal("99999.000000000000000002"))
            ]
        )
        span = {"start": START, "end": START + timedelta(days=1)}
        return (await provider.fetch_usage(UsageQuery(meter_id=meter.id, **span))).total

    exact = Decimal("12345678901234667889.123456789012345680")  # 38 digits, none rounded
    assert asyncio.run(_both(any_url, scenario)) == (exact, exact)


def test_cancelling_an_id_twice_in_one_call_cancels_it_once(any_url: str) -> None:
    async def scenario(provider: Any) -> tuple[list[str], list[str]]:
        await provider.create_meter(MeterCreate(event_name="c"))
        await provider.ingest_usage_events(
            [UsageEvent(id=i, event_name="c", customer_id="t") for i in ("e1", "e2")]
        )
        result = await provider.cancel_usage_events(["e1", "e1", "zz", "e2"])
        return result.cancelled, sorted(result.rejected)

    memory, store = asyncio.run(_both(any_url, scenario))
    assert store == memory == (["e1", "e2"], ["e1"])


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://app:S3cr/t!pw@127.0.0.1:1/appdb", "S3cr/t!pw"),
        ("postgresql://app:S3cr@t!pw@127.0.0.1:1/appdb", "t!pw"),
        ("postgresql://app@127.0.0.1:1/appdb?password=S3cr3t", "S3cr3t"),
        ("postgresql://app@127.0.0.1:1/appdb?PASSWORD=S3cr3t", "S3cr3t"),
        ("app:S3cr3t!pw@nowhere", "S3cr3t"),
        ("postgresql://app:S3cr3t@127.0.0.1:abc/appdb", "S3cr3t"),
    ],
)
def test_no_url_form_shows_its_password(url: str, secret: str) -> None:
    settings = SqlSettings(url=url)
    assert secret not in repr(settings)
    with pytest.raises((ConfigurationError, ProviderUnavailableError)) as caught:
        _open(url)
    assert secret not in str(caught.value)


def test_bad_cursors_and_cleared_names_are_refused_before_the_store(sqlite_url: str) -> None:
    from metering_core import MeterUpdate

    async def scenario() -> None:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        cursor = base64.urlsafe_b64encode(b"m" + b"9" * 30).decode()
        try:
            with pytest.raises(ValidationError, match="cursor"):
                await provider.fetch_all_meters(cursor=cursor)
        finally:
            await provider.aclose()

    asyncio.run(scenario())
    with pytest.raises(ValidationError, match="display_name cannot be cleared"):
        MeterUpdate(display_name=None)


def test_processes_opening_a_new_sqlite_store_together_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    script = (
        "import asyncio, sys\n"
        "from metering_core.sql import SqlSettings\n"
        "from metering_core.sql.provider import SqlProvider\n"
        "async def main():\n"
        f"    p = SqlProvider(SqlSettings(url={url!r}))\n"
        "    await p.fetch_all_meters(); await p.aclose()\n"
        "asyncio.run(main())\n"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    failures = [run.communicate(timeout=60)[1] for run in runs if run.wait(60) != 0]
    assert failures == []


@pytest.mark.parametrize("text", ["a\x00b", "a\ud800b"], ids=["nul", "lone-surrogate"])
def test_ids_no_store_can_hold_are_bad_input_on_every_route(any_url: str, text: str) -> None:
    """A NUL or a lone surrogate in a meter id, a customer id, a cancelled id, a meter's
    name or an offboarding message's tenant: a 422 naming the field, never the store's
    failure (PostgreSQL answered 502 with its address; SQLite, 500)."""
    from fastapi.testclient import TestClient

    from metering_core import AsyncMetering
    from metering_core.server import create_app

    scopes = ["meters:read", "meters:write", "usage:write", "customers:write"]
    keys = {"k": {"scopes": scopes}}
    app = create_app(AsyncMetering("sql", url=any_url), keys=keys)
    auth = {"Authorization": "Bearer k", "content-type": "application/json"}
    paths = [f"/meters/{quote(text)}", f"/customers/{quote(text)}"] if "\x00" in text else []
    offboard = {"detail-type": "OFFBOARDING_REQUEST", "detail": {"tenantId": text}}
    requests = [
        *(("GET", path, None) for path in paths[:1]),
        *(("DELETE", path, None) for path in paths),
        ("DELETE", "/usage", json.dumps({"event_ids": [text]})),
        ("POST", "/meters", json.dumps({"event_name": "m", "display_name": text})),
        ("POST", "/events", json.dumps(offboard)),
    ]
    with TestClient(app) as client:
        for method, path, body in requests:
            answer = client.request(method, path, content=body, headers=auth)
            assert answer.status_code == 422, (method, path, answer.text)
            assert answer.json()["error"]["type"] == "validation_error"


def test_averages_of_38_digit_values_keep_every_integer_digit(any_url: str) -> None:
    """An average is rounded half-even to 18 places (a value's own), never to 28 significant
    digits: those cut a 38-digit average's fraction and would cut integer digits next."""
    values = [
        Decimal("12345678901234567890.123456789012345678"),
        Decimal("12345678901234567891.123456789012345679"),
    ]

    async def scenario(provider: Any) -> list[str]:
        answers = []
        for name, sent in (("big", values), ("thirds", [Decimal(1), Decimal(2), Decimal(2)])):
            meter = await provider.create_meter(MeterCreate(event_name=name, aggregation="avg"))
            await provider.ingest_usage_events(
                [
                    UsageEvent(event_name=name, customer_id="t", value=v, timestamp=START)
                    for v in sent
                ]
            )
            span = {"start": START, "end": START + timedelta(days=1)}
            usage = await provider.fetch_usage(UsageQuery(meter_id=meter.id, **span))
            answers.append(str(usage.rows[0].value))
        return answers

    expected = ["12345678901234567890.623456789012345678", "1.666666666666666667"]
    assert asyncio.run(_both(any_url, scenario)) == (expected, expected)


@pytest.mark.parametrize(
    ("aggregation", "sent", "shown"),
    [
        ("sum", ["677.500", "0.000"], "677.5"),
        ("min", ["-0.000", "3"], "0"),
        ("max", ["100.0"], "100"),
        ("sum", ["0.1", "-0.1"], "0"),
    ],
)
def test_numbers_read_back_in_one_form_on_every_store(
    any_url: str, aggregation: str, sent: list[str], shown: str
) -> None:
    """`677.5`, never `677.500000000000000000` (PostgreSQL's numeric scale) on one store and
    `677.500` on another; `0`, never `-0`; `100`, never `1E+2`."""

    async def scenario(provider: Any) -> str:
        meter = await provider.create_meter(MeterCreate(event_name="n", aggregation=aggregation))
        await provider.ingest_usage_events(
            [
                UsageEvent(event_name="n", customer_id="t", value=Decimal(v), timestamp=START)
                for v in sent
            ]
        )
        span = {"start": START, "end": START + timedelta(days=1)}
        usage = await provider.fetch_usage(UsageQuery(meter_id=meter.id, **span))
        return str(usage.rows[0].value)

    assert asyncio.run(_both(any_url, scenario)) == (shown, shown)


@pytest.mark.parametrize("group_by", [("customer_id",), ("region",)])
def test_an_answer_of_exactly_the_row_limit_is_whole_and_one_row_more_is_refused(
    any_url: str, group_by: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the limit the answer is given whole, never cut short; past it, refused (both the
    per-event grouping and the plain fold)."""
    import metering_core.memory as memory_module
    import metering_core.sql.usage as sql_usage

    for module in (memory_module, sql_usage):
        monkeypatch.setattr(module, "MAX_ROWS", 4)

    async def scenario(provider: Any) -> tuple[int, str]:
        meter = await provider.create_meter(MeterCreate(event_name="r", dimensions=["region"]))
        at_limit = UsageQuery(
            meter_id=meter.id, start=START, end=START + timedelta(days=1), group_by=group_by
        )
        await provider.ingest_usage_events(
            [
                UsageEvent(
                    event_name="r",
                    customer_id=f"t{i}",
                    dimensions={"region": f"r{i}"},
                    timestamp=START,
                )
                for i in range(4)
            ]
        )
        rows = len((await provider.fetch_usage(at_limit)).rows)
        await provider.ingest_usage_events(
            [
                UsageEvent(
                    event_name="r", customer_id="t9", dimensions={"region": "r9"}, timestamp=START
                )
            ]
        )
        with pytest.raises(ValidationError, match="MAX_ROWS") as refused:
            await provider.fetch_usage(at_limit)
        return rows, refused.value.field

    assert asyncio.run(_both(any_url, scenario)) == ((4, "group_by"), (4, "group_by"))


@pytest.mark.parametrize("window", ["hour", None])
def test_a_range_off_the_quarter_hours_at_both_ends_counts_only_its_own_events(
    any_url: str, window: str | None
) -> None:
    """Rollups answer only ranges of whole quarter hours: a range cut inside a quarter hour
    at either end reads the events, or it would count the events just outside it."""

    async def scenario(provider: Any) -> list[tuple[datetime, Decimal]]:
        meter = await provider.create_meter(MeterCreate(event_name="q"))
        await provider.ingest_usage_events(
            [
                UsageEvent(event_name="q", customer_id="t", timestamp=START + timedelta(minutes=m))
                for m in (1, 20, 350, 359)
            ]
        )
        query = UsageQuery(
            meter_id=meter.id,
            start=START + timedelta(minutes=7),
            end=START + timedelta(minutes=353),
            window=window,
        )
        return [(r.start, r.value) for r in (await provider.fetch_usage(query)).rows]

    expected = (
        [(START + timedelta(minutes=7), Decimal(1)), (START + timedelta(hours=5), Decimal(1))]
        if window
        else [(START + timedelta(minutes=7), Decimal(2))]
    )
    assert asyncio.run(_both(any_url, scenario)) == (expected, expected)


def test_a_large_answer_is_typed_off_the_event_loop(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100,000 rows typed on the loop held /health for 1-2 s; a small answer stays on it
    (a thread hop costs more than the work)."""
    import threading

    import metering_core.sql.provider as provider_module

    threads: list[bool] = []
    typed = provider_module.usage_rows

    def watched(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return typed(*args)

    monkeypatch.setattr(provider_module, "usage_rows", watched)
    monkeypatch.setattr(provider_module, "OFF_LOOP_ROWS", 3)

    async def scenario() -> list[int]:
        provider = SqlProvider(SqlSettings(url=sqlite_url))
        meter = await provider.create_meter(MeterCreate(event_name="big"))
        await provider.ingest_usage_events(
            [UsageEvent(event_name="big", customer_id=f"t{i}", timestamp=START) for i in range(3)]
        )
        sizes = []
        for group_by in ((), ("customer_id",)):
            query = UsageQuery(
                meter_id=meter.id, start=START, end=START + timedelta(days=1), group_by=group_by
            )
            sizes.append(len((await provider.fetch_usage(query)).rows))
        await provider.aclose()
        return sizes

    assert asyncio.run(scenario()) == [1, 3]
    assert threads == [True, False]  # the loop runs in the main thread here


def _postgres_processes(backend_pid: int) -> list[int]:
    """The server's postmaster (the backend's parent) and every process it runs."""

    def parent(pid: int) -> int:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])

    postmaster = parent(backend_pid)
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent(int(entry.name)) == postmaster:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return [postmaster, *children]


def test_a_frozen_postgresql_fails_calls_as_retryable_instead_of_hanging(
    postgres_url: str,
) -> None:
    """The server stopped (SIGSTOP) under a running store: every call ends within its
    bounds as an outage to retry (503 at the service), and all works once it resumes."""
    import signal

    import asyncpg

    quick = {"connect_timeout": 1, "statement_timeout": 1, "pool_timeout": 1}

    async def scenario() -> None:
        provider = SqlProvider(SqlSettings(url=postgres_url, **quick))
        await provider.upgrade_schema()
        meter = await provider.create_meter(MeterCreate(event_name="frozen"))
        probe = await asyncpg.connect(postgres_url)
        processes = _postgres_processes(await probe.fetchval("SELECT pg_backend_pid()"))
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        try:
            sent = [UsageEvent(id="f1", event_name="frozen", customer_id="t", timestamp=START)]
            for call in (
                provider.ingest_usage_events(sent),
                provider.fetch_meter(meter.id),
                provider.fetch_usage(
                    UsageQuery(meter_id=meter.id, start=START, end=START + timedelta(days=1))
                ),
            ):
                with pytest.raises(ProviderUnavailableError):
                    await asyncio.wait_for(call, 30)  # a guard: the bound is seconds
        finally:
            for pid in processes:
                os.kill(pid, signal.SIGCONT)
        await probe.close()
        answer = await provider.ingest_usage_events(sent)
        assert answer.accepted + answer.duplicates == ["f1"]
        await provider.aclose()

    asyncio.run(scenario())


def test_every_pooled_connection_held_is_a_retryable_failure_not_an_internal_error(
    postgres_url: str,
) -> None:
    """Ingests queued behind a table lock past the pool's and the statements' bounds fail
    as an outage (503 with Retry-After at the service), never 500 after 30 s."""
    import asyncpg

    quick = {"connect_timeout": 1, "statement_timeout": 1, "pool_timeout": 1}

    async def scenario() -> list[str]:
        provider = SqlProvider(SqlSettings(url=postgres_url, **quick))
        await provider.upgrade_schema()
        await provider.create_meter(MeterCreate(event_name="held"))
        holder = await asyncpg.connect(postgres_url)
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        try:
            calls = [
                provider.ingest_usage_events(
                    [UsageEvent(event_name="held", customer_id="t", timestamp=START)]
                )
                for _ in range(24)
            ]
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
        finally:
            await transaction.rollback()
            await holder.close()
        await provider.aclose()
        return sorted({type(outcome).__name__ for outcome in outcomes})

    assert asyncio.run(scenario()) == ["ProviderUnavailableError"]


def test_db_upgrade_on_postgresql_prints_its_revision_and_nothing_else(
    postgres_url: str, tmp_path: Path
) -> None:
    """It printed a 46-line 'Event loop is closed' traceback on success (its engine was
    made in one event loop and disposed in another)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env.update(METERING_PROVIDER="sql", METERING_SQL_URL=postgres_url, XDG_DATA_HOME=str(tmp_path))
    for args in (["db", "upgrade"], ["db", "current"], ["db", "upgrade"]):
        done = subprocess.run(
            [sys.executable, "-m", "metering_core.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
    head = schema_revisions()[0]
    assert done.stdout.strip() == f"at {head}"


@pytest.mark.parametrize("aggregation", ["sum", "min", "max", "avg"])
def test_per_customer_folds_on_the_events_are_exact_and_numeric(
    any_url: str, aggregation: str
) -> None:
    """Grouped by customer, the store folds the events themselves (not the rollups): sums
    stay exact (0.1 + 0.2 is 0.3, not a float's 0.30000000000000004) and min/max compare
    numbers, not their text ("10" sorts before "9")."""

    async def scenario(provider: Any) -> list[tuple[str | None, str]]:
        meter = await provider.create_meter(MeterCreate(event_name="n", aggregation=aggregation))
        await provider.ingest_usage_events(
            [
                UsageEvent(event_name="n", customer_id=who, value=Decimal(v), timestamp=START)
                for who, v in (("a", "0.1"), ("a", "0.2"), ("b", "9"), ("b", "10"), ("b", "2.5"))
            ]
        )
        query = UsageQuery(
            meter_id=meter.id,
            start=START,
            end=START + timedelta(days=1),
            group_by=("customer_id",),
        )
        return [(r.customer_id, str(r.value)) for r in (await provider.fetch_usage(query)).rows]

    expected = {
        "sum": [("a", "0.3"), ("b", "21.5")],
        "min": [("a", "0.1"), ("b", "2.5")],
        "max": [("a", "0.2"), ("b", "10")],
        "avg": [("a", "0.15"), ("b", "7.166666666666666667")],
    }[aggregation]
    assert asyncio.run(_both(any_url, scenario)) == (expected, expected)


def test_a_sqlite_upgrade_killed_at_any_point_leaves_a_store_that_starts(tmp_path: Path) -> None:
    """Each revision is one transaction: a SIGKILL anywhere in the upgrade from 0001 leaves
    0001 intact (or the new revision whole), and the next start upgrades and answers every
    event. Migration 0002's DDL committed as it ran: killed after it, the store was at
    0001 with the rollups table present, and every later start failed."""
    import shutil
    import signal

    template = tmp_path / "template.db"
    count = 60_000

    async def build() -> None:
        provider = SqlProvider(SqlSettings(url=f"sqlite:///{template}"))
        await provider.create_meter(MeterCreate(event_name="calls"))
        for offset in range(0, count, 5_000):
            await provider.ingest_usage_events(
                [
                    UsageEvent(
                        id=f"e{i}",
                        event_name="calls",
                        customer_id=f"t{i % 7}",
                        timestamp=START + timedelta(seconds=i),
                    )
                    for i in range(offset, offset + 5_000)
                ]
            )
        async with provider._transaction() as connection:  # back to revision 0001
            await connection.run_sync(lambda c: command.downgrade(_config(c), "0001"))
        await provider.aclose()

    asyncio.run(build())
    upgrade = (
        "import asyncio, sys\n"
        "from metering_core.sql import SqlSettings\n"
        "from metering_core.sql.provider import SqlProvider\n"
        "provider = SqlProvider(SqlSettings(url=f'sqlite:///{sys.argv[1]}'))\n"
        "print('go', flush=True)\n"
        "asyncio.run(provider.upgrade_schema())\n"
    )

    async def total(path: Path) -> Decimal:
        provider = SqlProvider(SqlSettings(url=f"sqlite:///{path}"))
        meter = (await provider.fetch_all_meters()).items[0]
        query = UsageQuery(meter_id=meter.id, start=START, end=START + timedelta(days=1))
        answer = (await provider.fetch_usage(query)).total
        await provider.aclose()
        return answer

    killed = 0
    for delay in (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5):
        store = tmp_path / f"store-{delay}.db"
        shutil.copy(template, store)
        child = subprocess.Popen(
            [sys.executable, "-c", upgrade, str(store)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        child.stdout.readline()  # imported: the upgrade is starting
        time.sleep(delay)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            killed += 1
        child.wait(60)
        assert asyncio.run(total(store)) == count, f"killed after {delay} s"
    assert killed >= 3, "the upgrade finished before most kills: make the store larger"


def test_a_migration_is_not_cut_by_the_statement_timeout(postgres_url: str) -> None:
    """Waiting for another process's migration (or a long rebuild) took longer than
    statement_timeout and failed every start during it."""
    import asyncpg

    async def scenario() -> list[str]:
        holder = await asyncpg.connect(postgres_url)
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock(4242001)")  # a migration under way
        provider = SqlProvider(SqlSettings(url=postgres_url, statement_timeout=1))
        upgrade = asyncio.create_task(provider.upgrade_schema())
        await asyncio.sleep(2.5)  # past the statement bound
        assert not upgrade.done()
        await transaction.rollback()
        await holder.close()
        revision = await asyncio.wait_for(upgrade, 30)
        meters = await provider.fetch_all_meters()
        await provider.aclose()
        return [revision, *[m.id for m in meters.items]]

    assert asyncio.run(scenario()) == [schema_revisions()[0]]


def test_trusted_models_share_no_state_a_change_could_reach() -> None:
    """Models made from the store's rows share one set of the fields given: only frozen
    models may, whose set never changes; a copy with changes gets a set of its own."""
    make = Trusted(UsageEvent)
    fields = UsageEvent(event_name="calls", customer_id="t1", timestamp=START).model_dump()
    first, second = make(dict(fields)), make(dict(fields))
    changed = first.model_copy(update={"value": Decimal(2)})
    assert changed.value == 2
    assert first.value == 1
    assert first.model_fields_set == second.model_fields_set == set(UsageEvent.model_fields)
    with pytest.raises(PydanticValidationError):
        first.value = Decimal(3)  # type: ignore[misc]
    assert second.model_fields_set == set(UsageEvent.model_fields)
    with pytest.raises(TypeError, match="IngestResult is not frozen"):
        Trusted(IngestResult)


@pytest.mark.parametrize("store", ["memory", "sqlite", "postgres"])
def test_a_json_lines_export_is_the_same_bytes_from_every_store(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL gives dimensions back in `jsonb`'s order of keys (by length), the other
    stores as they were given: the export writes them sorted, so that files of the same
    events compare equal whichever store wrote them."""
    options: dict[str, Any] = {}
    if store == "sqlite":
        options["url"] = f"sqlite:///{tmp_path / 'metering.db'}"
    elif store == "postgres":
        options["url"] = request.getfixturevalue("postgres_url")
    at = datetime(2026, 3, 1, 10, tzinfo=UTC)
    with Metering("memory" if store == "memory" else "sql", **options) as m:
        meter = m.create_meter(event_name="calls", dimensions=["region"])
        dimensions = {"region": "eu", "zz": "1", "account": "a"}  # jsonb: zz, region, account
        m.ingest_usage_event(
            id="e1", event_name="calls", customer_id="acme", timestamp=at, dimensions=dimensions
        )
        m.flush()
        page = m.list_usage_events(meter_id=meter.id, start=at, end=at + timedelta(hours=1))
    assert piece(page.items, ExportFormat.jsonl, []) == (
        '{"id":"e1","event_name":"calls","customer_id":"acme",'
        '"timestamp":"2026-03-01T10:00:00+00:00","value":"1",'
        '"dimensions":{"account":"a","region":"eu","zz":"1"}}\n'
    )
