"""The events behind a number: filtered usage and keyset listing over PostgreSQL with
10M stored events, and a CSV export of 1M events from SQLite (rate and memory).

    python benchmarks/bench_listing.py [--postgres URL] [--stored N] [--exported N]

`--postgres postgresql://user@host:port/db` names an empty database (the tests' private
server recipe: tests/stores.py); without it only the SQLite export is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from metering_core import EventQuery, MeterCreate, UsageEvent, UsageQuery
from metering_core.cursors import encode_event_cursor
from metering_core.sql import SqlSettings
from metering_core.sql.provider import SqlProvider
from metering_core.sql.schema import BUCKET

START = datetime(2026, 1, 1, tzinfo=UTC)
SPAN = 90 * 86400
CUSTOMERS = 1000
REGIONS = ("eu", "us", "ap")
PLANS = ("free", "pro")


def dimensions(i: int) -> dict[str, str]:
    return {"region": REGIONS[i % 3], "plan": PLANS[i // 3 % 2]}


async def best(call: object, tries: int = 5) -> float:
    fastest = float("inf")
    for _ in range(tries):
        began = time.perf_counter()
        await call()  # type: ignore[operator]
        fastest = min(fastest, time.perf_counter() - began)
    return fastest


async def run_postgres(url: str, stored: int) -> None:
    """`stored` events loaded by COPY (with their rollups, as a bulk load must), then the
    issue's queries, best of five."""
    import asyncpg

    provider = SqlProvider(SqlSettings(url=url))
    meter = await provider.create_meter(
        MeterCreate(event_name="api_calls", dimensions=["region", "plan"])
    )
    connection = await asyncpg.connect(url)
    meter_seq = await connection.fetchval("SELECT seq FROM meters WHERE id = $1", meter.id)
    columns = ["id", "meter_seq", "event_name", "customer_id", "ts", "value", "dimensions"]
    start = int(START.timestamp() * 1e6)
    began = time.perf_counter()
    for first in range(0, stored, 200_000):
        chunk = [
            (
                f"b-{i}",
                meter_seq,
                "api_calls",
                f"tenant-{i % CUSTOMERS}",
                start + i * SPAN * 1_000_000 // stored,
                Decimal(i % 7 + 1),
                json.dumps(dimensions(i)),
            )
            for i in range(first, min(stored, first + 200_000))
        ]
        await connection.copy_records_to_table("events", records=chunk, columns=columns)
    await connection.execute(
        f"""
        INSERT INTO rollups AS r (meter_seq, bucket, digest, dimensions, count, total)
        SELECT meter_seq, bucket, md5(dimensions), dimensions, count(*), sum(value)
        FROM (
            SELECT meter_seq, ts - ts % {BUCKET} AS bucket,
                   CAST(CAST(dimensions AS jsonb) AS text) AS dimensions, value
            FROM events
        ) AS loaded
        GROUP BY meter_seq, bucket, dimensions
        """
    )
    await connection.execute("VACUUM ANALYZE events")
    await connection.execute("VACUUM ANALYZE rollups")
    print(f"postgres: {stored:,} events loaded in {time.perf_counter() - began:.0f} s")

    two_regions = {"region": ("eu", "us")}
    month = UsageQuery(
        meter_id=meter.id,
        start=START,
        end=START + timedelta(days=31),
        window="day",
        filters=two_regions,
        group_by=("region",),
    )
    off_quarter = month.model_copy(update={"start": START + timedelta(minutes=1)})
    one = UsageQuery(
        meter_id=meter.id,
        customer_id="tenant-7",
        start=START,
        end=START + timedelta(days=30),
        window="day",
        filters={**two_regions, "plan": ("pro",)},
    )
    rolled = await best(lambda: provider.fetch_usage(month))
    unrolled = await best(lambda: provider.fetch_usage(off_quarter), tries=3)
    customer = await best(lambda: provider.fetch_usage(one))
    print(
        f"postgres filtered month, all customers, two regions, by day: {rolled * 1000:.1f} ms "
        f"(rollups); {unrolled * 1000:.0f} ms off the quarter hours (from the events)"
    )
    print(f"postgres one customer's filtered 30 days, by day: {customer * 1000:.1f} ms")

    listing = EventQuery(meter_id=meter.id, start=START, end=START + timedelta(days=90), limit=100)
    ts, event_id = await connection.fetchrow(  # where page 10,000 begins (after 999,900)
        "SELECT ts, id FROM events WHERE meter_seq = $1"
        ' ORDER BY ts, id COLLATE "C" OFFSET 999899 LIMIT 1',
        meter_seq,
    )
    far = listing.model_copy(update={"cursor": encode_event_cursor(ts, event_id)})
    first_page = await best(lambda: provider.list_usage_events(listing))
    far_page = await best(lambda: provider.list_usage_events(far))
    filtered = listing.model_copy(update={"customer_id": "tenant-7", "filters": two_regions})
    their_page = await best(lambda: provider.list_usage_events(filtered))
    print(
        f"postgres listing, 100 a page: page 1 {first_page * 1000:.2f} ms, page 10,000 "
        f"{far_page * 1000:.2f} ms ({far_page / first_page:.2f}x); one customer, two regions "
        f"{their_page * 1000:.2f} ms"
    )
    await connection.close()
    await provider.aclose()


async def _load_sqlite(path: Path, count: int) -> None:
    provider = SqlProvider(SqlSettings(url=f"sqlite:///{path}"))
    await provider.create_meter(MeterCreate(event_name="api_calls", dimensions=["region", "plan"]))
    batch = 5000
    for first in range(0, count, batch):
        events = [
            UsageEvent(
                id=f"e-{i}",
                event_name="api_calls",
                customer_id=f"tenant-{i % CUSTOMERS}",
                value=Decimal(i % 7 + 1),
                timestamp=START + timedelta(seconds=i * SPAN / count),
                dimensions=dimensions(i),
            )
            for i in range(first, min(count, first + batch))
        ]
        await provider.ingest_usage_events(events)
    await provider.aclose()


def _export(path: Path, out: Path, days: float) -> float:
    """`metering export` as a user runs it, in its own process; its peak RSS in MiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from metering_core.cli import main; main()",
            "--provider",
            "sql",
            "export",
            "api_calls",
            "--from",
            START.isoformat(),
            "--to",
            (START + timedelta(days=days)).isoformat(),
            "--format",
            "csv",
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
        env={"METERING_SQL_URL": f"sqlite:///{path}", "PATH": ""},
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(peak, before) / 1024


def run_sqlite_export(count: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "metering.db"
        asyncio.run(_load_sqlite(path, count))
        tiny = _export(path, Path(folder) / "tiny.csv", 1e-9)  # a range holding one event
        began = time.perf_counter()
        whole = _export(path, Path(folder) / "all.csv", 90)
        elapsed = time.perf_counter() - began
        rows = sum(1 for _ in (Path(folder) / "all.csv").open()) - 1
        assert rows == count, rows
    print(
        f"sqlite export of {count:,} events as CSV: {count / elapsed:,.0f} rows/s "
        f"({elapsed:.1f} s, process start included); peak RSS {whole:.0f} MiB against "
        f"{tiny:.0f} MiB exporting nothing (growth {whole - tiny:.0f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres")
    parser.add_argument("--stored", type=int, default=10_000_000)
    parser.add_argument("--exported", type=int, default=1_000_000)
    args = parser.parse_args()
    run_sqlite_export(args.exported)
    if args.postgres:
        asyncio.run(run_postgres(args.postgres, args.stored))


if __name__ == "__main__":
    main()
