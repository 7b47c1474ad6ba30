"""The sql provider: ingest beside a raw driver write of the same rows into the same table,
bytes on disk per event, and a usage query beside a sequential scan.

    python benchmarks/bench_sql.py [--events N] [--postgres URL]

PostgreSQL is measured when `--postgres postgresql://user@host:port/db` names an empty
database (the tests' private server recipe: tests/sql/conftest.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from metering_core import MeterCreate, UsageEvent, UsageQuery
from metering_core.models import new_event_id
from metering_core.sql import SqlSettings
from metering_core.sql.provider import SqlProvider
from metering_core.sql.schema import BUCKET

START = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = 500


SPAN = 90 * 86400


def make_events(count: int, prefix: str, scattered: bool = False) -> list[UsageEvent]:
    """1,000 customers over 90 days: in time order as live usage arrives, or scattered
    over the whole span as a backfill of old files may be."""
    return [
        UsageEvent(
            id=f"{prefix}-{i}",
            event_name="api_calls",
            customer_id=f"tenant-{i % 1000}",
            value=Decimal(i % 7 + 1),
            timestamp=START
            + timedelta(seconds=(i * 7919) % SPAN if scattered else i * SPAN / count),
            dimensions={"region": ("eu", "us", "ap")[i % 3]},
        )
        for i in range(count)
    ]


async def ingest(provider: SqlProvider, events: list[UsageEvent]) -> float:
    began = time.perf_counter()
    for offset in range(0, len(events), BATCH):
        result = await provider.ingest_usage_events(events[offset : offset + BATCH])
        assert len(result.accepted) == len(events[offset : offset + BATCH])
    return len(events) / (time.perf_counter() - began)


def raw_sqlite(path: Path, events: list[UsageEvent]) -> float:
    """The same rows, by the stdlib driver's executemany, into the same table."""
    import json

    db = sqlite3.connect(path)
    rows = [
        (
            e.id,
            1,
            e.event_name,
            e.customer_id,
            int(e.timestamp.timestamp() * 1e6),
            str(e.value),
            json.dumps(e.dimensions),
        )
        for e in events
    ]
    began = time.perf_counter()
    for offset in range(0, len(rows), BATCH):
        with db:
            db.executemany(
                "INSERT INTO events (id, meter_seq, event_name, customer_id, ts, value, dimensions)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                rows[offset : offset + BATCH],
            )
    rate = len(rows) / (time.perf_counter() - began)
    db.close()
    return rate


async def query_vs_scan(provider: SqlProvider, meter_id: str) -> tuple[float, float]:
    """One customer, 30 day windows (best of 5), beside folding every event in Python."""
    query = UsageQuery(
        meter_id=meter_id,
        customer_id="tenant-7",
        start=START,
        end=START + timedelta(days=30),
        window="day",
    )
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        await provider.fetch_usage(query)
        best = min(best, time.perf_counter() - began)
    import sqlalchemy as sa

    from metering_core.sql.schema import events

    engine = await provider._connected()
    began = time.perf_counter()
    async with engine.connect() as connection:
        total = Decimal(0)
        for row in await connection.execute(sa.select(events.c.customer_id, events.c.value)):
            if row.customer_id == "tenant-7":
                total += Decimal(str(row.value))
    scan = time.perf_counter() - began
    return best, scan


async def _empty_store(path: Path) -> SqlProvider:
    provider = SqlProvider(SqlSettings(url=f"sqlite:///{path}"))
    await provider.fetch_all_meters()  # the schema, empty
    return provider


async def rollups_on_and_off(make: Callable[[str], Awaitable[SqlProvider]], count: int) -> str:
    """Ingest into a sum meter (rolled up) and a latest meter (not), interleaved, best of 3."""
    rates: dict[str, float] = {}
    for attempt in range(3):
        for aggregation in ("sum", "latest"):
            provider = await make(f"{aggregation}-{attempt}")
            name = f"calls_{aggregation}"
            await provider.create_meter(MeterCreate(event_name=name, aggregation=aggregation))
            events = [
                e.model_copy(update={"event_name": name})
                for e in make_events(count, f"{aggregation}{attempt}")
            ]
            rate = await ingest(provider, events)
            await provider.aclose()
            rates[aggregation] = max(rates.get(aggregation, 0.0), rate)
    return (
        f"rollups on (sum meter) {rates['sum']:,.0f} events/s, off (latest meter) "
        f"{rates['latest']:,.0f} events/s: cost {1 - rates['sum'] / rates['latest']:.0%}"
    )


async def by_kind_of_id(make: Callable[[str], Awaitable[SqlProvider]], count: int) -> str:
    """The same events under sequential ids, random UUIDs (v4) and the default (v7)."""
    rates = {}
    for kind, new_id in (
        ("sequential", None),
        ("uuid4", lambda: str(uuid.uuid4())),
        ("uuid7 (default)", new_event_id),
    ):
        provider = await make(f"ids-{kind}")
        await provider.create_meter(MeterCreate(event_name="api_calls", dimensions=["region"]))
        events = make_events(count, "s")
        if new_id is not None:
            events = [e.model_copy(update={"id": new_id()}) for e in events]
        rates[kind] = await ingest(provider, events)
        await provider.aclose()
    return ", ".join(f"{kind} {rate:,.0f} events/s" for kind, rate in rates.items())


async def run_sqlite(count: int) -> None:
    folder = Path(tempfile.mkdtemp())

    async def fresh(name: str) -> SqlProvider:
        return await _empty_store(folder / f"{name}.db")

    print(f"sqlite ingest: {await rollups_on_and_off(fresh, count)}")
    print(f"sqlite ingest by kind of event id: {await by_kind_of_id(fresh, count)}")
    for scattered in (False, True):
        order = "scattered (backfill)" if scattered else "in time order (live)"
        provider = await _empty_store(folder / f"store-{scattered}.db")
        meter = await provider.create_meter(
            MeterCreate(event_name="api_calls", dimensions=["region"])
        )
        if not scattered:
            queried = meter.id
        rate = await ingest(provider, make_events(count, "p", scattered))
        await provider.aclose()
        await (await _empty_store(folder / f"raw-{scattered}.db")).aclose()
        raw = raw_sqlite(folder / f"raw-{scattered}.db", make_events(count, "r", scattered))
        print(
            f"sqlite ingest {order}, batches of {BATCH}: {rate:,.0f} events/s; raw "
            f"executemany {raw:,.0f}/s; ratio {rate / raw:.2f}x"
        )
    provider = SqlProvider(SqlSettings(url=f"sqlite:///{folder / 'store-False.db'}"))
    best, scan = await query_vs_scan(provider, queried)
    await provider.aclose()
    size = sum(p.stat().st_size for p in folder.glob("store-False.db*"))  # noqa: ASYNC240
    print(
        f"sqlite fetch_usage over {count:,} events, 1 customer, 30 days: {best * 1000:.1f} ms;"
        f" full scan {scan * 1000:.0f} ms ({scan / best:.0f}x)"
    )
    print(f"sqlite bytes on disk per event: {size / count:.0f}")


async def _timed(provider: SqlProvider, query: UsageQuery, tries: int) -> float:
    best = float("inf")
    for _ in range(tries):
        began = time.perf_counter()
        await provider.fetch_usage(query)
        best = min(best, time.perf_counter() - began)
    return best


async def run_postgres(url: str, count: int, stored: int) -> None:
    """Ingest beside COPY on `count` events; then queries over `stored` events (bulk-loaded
    by COPY), with the planner's index paths on and off (a sequential scan)."""
    import asyncpg

    async def fresh(name: str) -> SqlProvider:
        provider = SqlProvider(SqlSettings(url=url))
        for meter in (await provider.fetch_all_meters()).items:
            await provider.delete_meter(meter.id)  # its events stay, under another name
        return provider

    print(f"postgres ingest: {await rollups_on_and_off(fresh, count)}")
    provider = SqlProvider(SqlSettings(url=url))
    meter = await provider.create_meter(MeterCreate(event_name="api_calls", dimensions=["region"]))
    rate = await ingest(provider, make_events(count, "p"))
    connection = await asyncpg.connect(url)
    meter_seq = await connection.fetchval("SELECT seq FROM meters WHERE id = $1", meter.id)
    columns = ["id", "meter_seq", "event_name", "customer_id", "ts", "value", "dimensions"]

    def records(prefix: str, first: int, last: int, total: int) -> list[tuple[object, ...]]:
        start = int(START.timestamp() * 1e6)
        return [
            (
                f"{prefix}-{i}",
                meter_seq,
                "api_calls",
                f"tenant-{i % 1000}",
                start + i * SPAN * 1_000_000 // total,
                Decimal(i % 7 + 1),
                json.dumps({"region": ("eu", "us", "ap")[i % 3]}),
            )
            for i in range(first, last)
        ]

    copied = records("c", 0, count, count)
    began = time.perf_counter()
    for offset in range(0, count, BATCH):
        await connection.copy_records_to_table(
            "events", records=copied[offset : offset + BATCH], columns=columns
        )
    copy = count / (time.perf_counter() - began)
    await connection.execute("DELETE FROM events WHERE id LIKE 'c-%'")
    print(
        f"postgres ingest, batches of {BATCH}: {rate:,.0f} events/s; COPY {copy:,.0f}/s; "
        f"ratio {rate / copy:.2f}x"
    )
    began = time.perf_counter()
    for first in range(count, stored, 200_000):
        chunk = records("b", first, min(stored, first + 200_000), stored)
        await connection.copy_records_to_table("events", records=chunk, columns=columns)
    await connection.execute(  # as a bulk load must: the loaded events' rollups
        f"""
        INSERT INTO rollups AS r (meter_seq, bucket, digest, dimensions, count, total)
        SELECT meter_seq, bucket, md5(dimensions), dimensions, count(*), sum(value)
        FROM (
            SELECT meter_seq, ts - ts % {BUCKET} AS bucket,
                   CAST(CAST(dimensions AS jsonb) AS text) AS dimensions, value
            FROM events WHERE id LIKE 'b-%'
        ) AS loaded
        GROUP BY meter_seq, bucket, dimensions
        ON CONFLICT (meter_seq, bucket, digest) DO UPDATE
        SET count = r.count + excluded.count, total = r.total + excluded.total
        """
    )
    await connection.execute("VACUUM ANALYZE events")
    await connection.execute("VACUUM ANALYZE rollups")
    rolled = await connection.fetchval("SELECT count(*) FROM rollups")
    size = await connection.fetchval("SELECT pg_total_relation_size('events')")
    print(
        f"postgres: {stored:,} events stored ({time.perf_counter() - began:.0f} s to load); "
        f"{size / stored:.0f} bytes on disk per event (table and indexes)"
    )
    one = UsageQuery(
        meter_id=meter.id,
        customer_id="tenant-7",
        start=START,
        end=START + timedelta(days=30),
        window="day",
    )
    everyone = UsageQuery(
        meter_id=meter.id,
        start=START,
        end=START + timedelta(days=31),
        window="month",
        group_by=("region",),
    )
    # the same, a minute later: not whole hours, so the rollups cannot answer it
    from_events = everyone.model_copy(update={"start": START + timedelta(minutes=1)})
    indexed = (await _timed(provider, one, 5), await _timed(provider, everyone, 5))
    unrolled = await _timed(provider, from_events, 3)
    await provider.aclose()
    database = url.rsplit("/", 1)[1]
    await connection.execute(f'ALTER DATABASE "{database}" SET enable_indexscan = off')
    await connection.execute(f'ALTER DATABASE "{database}" SET enable_bitmapscan = off')
    scanning = SqlProvider(SqlSettings(url=url))
    scanned = (await _timed(scanning, one, 1), await _timed(scanning, from_events, 1))
    await scanning.aclose()
    await connection.execute(f'ALTER DATABASE "{database}" RESET ALL')
    await connection.close()
    print(
        f"postgres fetch_usage, one customer, 30 day windows: {indexed[0] * 1000:.1f} ms; "
        f"sequential scan {scanned[0] * 1000:.0f} ms ({scanned[0] / indexed[0]:.0f}x)"
    )
    print(
        f"postgres fetch_usage, all customers by region, one month window: "
        f"{indexed[1] * 1000:.1f} ms from {rolled:,} rollup rows; from the events "
        f"{unrolled * 1000:.0f} ms; sequential scan of the events {scanned[1] * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--postgres")
    parser.add_argument("--stored", type=int, default=10_000_000, help="PostgreSQL query size")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()
    if not args.skip_sqlite:
        asyncio.run(run_sqlite(args.events))
    if args.postgres:
        asyncio.run(run_postgres(args.postgres, args.events, args.stored))


if __name__ == "__main__":
    main()
