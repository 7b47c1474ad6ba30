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
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from metering_core import MeterCreate, UsageEvent, UsageQuery
from metering_core.sql import SqlSettings
from metering_core.sql.provider import SqlProvider

START = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = 500


def make_events(count: int, prefix: str) -> list[UsageEvent]:
    return [
        UsageEvent(
            id=f"{prefix}-{i}",
            event_name="api_calls",
            customer_id=f"tenant-{i % 1000}",
            value=Decimal(i % 7 + 1),
            timestamp=START + timedelta(seconds=(i * 7919) % (90 * 86400)),
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


async def run_sqlite(count: int) -> None:
    folder = Path(tempfile.mkdtemp())
    provider = SqlProvider(SqlSettings(url=f"sqlite:///{folder / 'store.db'}"))
    meter = await provider.create_meter(MeterCreate(event_name="api_calls", dimensions=["region"]))
    rate = await ingest(provider, make_events(count, "p"))
    await provider.aclose()
    raw_path = folder / "raw.db"
    provider = SqlProvider(SqlSettings(url=f"sqlite:///{raw_path}"))
    await provider.fetch_all_meters()  # the same schema, empty
    await provider.aclose()
    raw = raw_sqlite(raw_path, make_events(count, "r"))
    provider = SqlProvider(SqlSettings(url=f"sqlite:///{folder / 'store.db'}"))
    best, scan = await query_vs_scan(provider, meter.id)
    await provider.aclose()
    size = sum(p.stat().st_size for p in folder.glob("store.db*"))  # noqa: ASYNC240
    print(
        f"sqlite ingest, batches of {BATCH}: {rate:,.0f} events/s; raw executemany "
        f"{raw:,.0f}/s; ratio {rate / raw:.2f}x"
    )
    print(
        f"sqlite fetch_usage over {count:,} events, 1 customer, 30 days: {best * 1000:.1f} ms;"
        f" full scan {scan * 1000:.0f} ms ({scan / best:.0f}x)"
    )
    print(f"sqlite bytes on disk per event: {size / count:.0f}")


async def run_postgres(url: str, count: int) -> None:
    import asyncpg

    provider = SqlProvider(SqlSettings(url=url))
    meter = await provider.create_meter(MeterCreate(event_name="api_calls", dimensions=["region"]))
    rate = await ingest(provider, make_events(count, "p"))
    events = make_events(count, "c")
    connection = await asyncpg.connect(url)
    records = [
        (
            e.id,
            1,
            e.event_name,
            e.customer_id,
            int(e.timestamp.timestamp() * 1e6),
            e.value,
            json.dumps(e.dimensions),
            False,
        )
        for e in events
    ]
    began = time.perf_counter()
    for offset in range(0, count, BATCH):
        await connection.copy_records_to_table(
            "events",
            records=records[offset : offset + BATCH],
            columns=[
                "id",
                "meter_seq",
                "event_name",
                "customer_id",
                "ts",
                "value",
                "dimensions",
                "cancelled",
            ],
        )
    copy = count / (time.perf_counter() - began)
    await connection.execute("DELETE FROM events WHERE id LIKE 'c-%'")
    await connection.execute("VACUUM ANALYZE events")
    size = await connection.fetchval("SELECT pg_total_relation_size('events')")
    await connection.close()
    best, scan = await query_vs_scan(provider, meter.id)
    await provider.aclose()
    print(
        f"postgres ingest, batches of {BATCH}: {rate:,.0f} events/s; COPY {copy:,.0f}/s; "
        f"ratio {rate / copy:.2f}x"
    )
    print(
        f"postgres fetch_usage over {count:,} events, 1 customer, 30 days: "
        f"{best * 1000:.1f} ms; full scan {scan * 1000:.0f} ms ({scan / best:.0f}x)"
    )
    print(f"postgres bytes on disk per event (table and indexes): {size / count:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--postgres")
    args = parser.parse_args()
    asyncio.run(run_sqlite(args.events))
    if args.postgres:
        asyncio.run(run_postgres(args.postgres, args.events))


if __name__ == "__main__":
    main()
