"""The events of several customers, exported a page at a time from PostgreSQL: as fast
as one customer's (a generic plan once read every remaining event of the customers named
and sorted them, for each page).

    python benchmarks/bench_listing_customers.py --postgres URL [--stored N]

`--postgres postgresql://user@host:port/db` names a server; a fresh database is made on
it. Two customers hold two fifths of the events each, the rest spread over 992 others.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from bench_mirrors import fresh

from metering_core import AsyncMetering, UsageEvent

START = datetime(2026, 3, 1, tzinfo=UTC)


def customer(i: int) -> str:
    share = i % 5
    return "big1" if share < 2 else "big2" if share < 4 else f"c{8 + (i // 5) % 992}"


async def main(url: str, stored: int) -> None:
    async with AsyncMetering("sql", url=url, linger=0) as m:
        await m.create_meter(event_name="perf")
        for first in range(0, stored, 10_000):
            await m.ingest_usage_events(
                [
                    UsageEvent(
                        id=f"e{i}",
                        event_name="perf",
                        customer_id=customer(i),
                        value=Decimal(1),
                        timestamp=START + timedelta(seconds=i),
                    )
                    for i in range(first, min(first + 10_000, stored))
                ]
            )
        await m.flush()
    connection = await asyncpg.connect(url)
    try:  # as autovacuum would have: just after a bulk load the plans are the statistics'
        await connection.execute("ANALYZE events")
    finally:
        await connection.close()
    async with AsyncMetering("sql", url=url) as m:
        for asked in ({"customer_id": "big1"}, {"customer_ids": ["big1", "c108"]}):
            began, count = time.perf_counter(), 0
            async for _ in m.iter_usage_events(
                event_name="perf", start=START, end=START + timedelta(days=365), **asked
            ):
                count += 1
            took = time.perf_counter() - began
            print(f"export {asked}: {count:,} events in {took:.1f} s ({count / took:,.0f}/s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True)
    parser.add_argument("--stored", type=int, default=1_000_000)
    arguments = parser.parse_args()
    asyncio.run(main(fresh(arguments.postgres), arguments.stored))
