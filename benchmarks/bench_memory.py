"""Memory provider figures: ingest rate, usage-query latency against a full scan, bytes per event.

Run: python benchmarks/bench_memory.py [--events 1000000]
Prints one line per figure; ratios are measured within this run, since machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from metering_core import AsyncMetering, MeterCreate, UsageEvent, UsageQuery
from metering_core.collector import eased
from metering_core.memory import MemoryProvider

START = datetime(2026, 10, 1, tzinfo=UTC)
CUSTOMERS = 1000


def row(i: int, count: int) -> dict[str, object]:
    """One event's fields: spread over 30 days and CUSTOMERS tenants, id given."""
    return {
        "id": str(uuid.UUID(int=i)),
        "event_name": "api_calls",
        "customer_id": f"tenant-{i % CUSTOMERS}",
        "value": i % 7 + 1,
        "timestamp": START + timedelta(days=30) * i / count,
    }


def rows(count: int) -> list[dict[str, object]]:
    return [row(i, count) for i in range(count)]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>12,.0f} events/s"


async def ingest_figures(count: int) -> None:
    fields = rows(count)
    began = time.perf_counter()
    models = [UsageEvent(**row) for row in fields]
    validation = time.perf_counter() - began
    print(f"validation floor (UsageEvent(**row), ids given)      {rate(count, validation)}")
    del models
    gc.collect()
    began = time.perf_counter()
    with eased(freeze=False):  # as the facade validates a batch of EASED_FROM events or more
        models = [UsageEvent(**row) for row in fields]
    eased_validation = time.perf_counter() - began
    print(f"the same, young collections eased (as the facade)     {rate(count, eased_validation)}")

    async with AsyncMetering(MemoryProvider(), linger=0.001) as m:
        await m.create_meter(event_name="api_calls")
        began = time.perf_counter()
        for offset in range(0, count, 10_000):
            await m.ingest_usage_events(models[offset : offset + 10_000])
        await m.flush()
        prebuilt = time.perf_counter() - began
    print(f"ingest_usage_events, pre-built models (facade)       {rate(count, prebuilt)}")

    async with AsyncMetering(MemoryProvider(), linger=0.001) as m:
        await m.create_meter(event_name="api_calls")
        began = time.perf_counter()
        for offset in range(0, count, 10_000):
            await m.ingest_usage_events(fields[offset : offset + 10_000])
        await m.flush()
        keyword = time.perf_counter() - began
    print(
        f"ingest_usage_events, field mappings (facade)         {rate(count, keyword)}"
        f"   = {validation / keyword:.2f}x of validation alone,"
        f" {eased_validation / keyword:.2f}x of it eased"
    )

    single = min(count, 100_000)
    async with AsyncMetering(MemoryProvider(), linger=0.001) as m:
        await m.create_meter(event_name="api_calls")
        began = time.perf_counter()
        for event in models[:single]:
            await m.ingest_usage_event(event)
        await m.flush()
        one_by_one = time.perf_counter() - began
    print(f"ingest_usage_event, one at a time (async facade)     {rate(single, one_by_one)}")


def full_scan(provider: MemoryProvider, customer: str, query: UsageQuery) -> Decimal:
    """The baseline: visit every stored event, as an unindexed store would."""
    total = Decimal(0)
    for stored in provider._meters.values():
        for series in stored.series.values():
            for position, micros in enumerate(series.times):
                value = series.values[position]
                if series.customer_id == customer and value is not None and micros >= 0:
                    total += value
    return total


async def query_figures(count: int) -> None:
    provider = MemoryProvider()
    meter = await provider.create_meter(MeterCreate(event_name="api_calls"))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for offset in range(0, count, 10_000):
        # built inside the traced window, so the ids and values the store keeps are counted
        batch = [UsageEvent(**row(i, count)) for i in range(offset, min(offset + 10_000, count))]
        await provider.ingest_usage_events(batch)
    del batch
    gc.collect()
    stored = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    query = UsageQuery(
        meter_id=meter.id,
        customer_id="tenant-7",
        start=START,
        end=START + timedelta(days=30),
        window="day",
    )
    await provider.fetch_usage(query)  # sorts lazily once, like any first query
    runs = 50
    began = time.perf_counter()
    for _ in range(runs):
        usage = await provider.fetch_usage(query)
    indexed = (time.perf_counter() - began) / runs
    began = time.perf_counter()
    scanned_total = full_scan(provider, "tenant-7", query)
    scan = time.perf_counter() - began
    assert usage.total == scanned_total, (usage.total, scanned_total)
    print(f"fetch_usage, {count:,} events, 30 day windows, 1 customer  {indexed * 1000:8.2f} ms")
    ratio = scan / indexed  # how many times faster the indexed query is
    print(f"full scan of the same events {scan * 1000:30.2f} ms   = {ratio:,.0f}x")
    print(f"stored bytes per event (tracemalloc: ids, values, index) {stored / count:6.0f} B")


def collection_ms() -> float:
    """The median of five full garbage collections, in ms."""
    times = []
    for _ in range(5):
        began = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - began) * 1000)
    return sorted(times)[2]


async def collection_figures(count: int) -> None:
    """How long a full garbage collection takes with `count` stored events, a region
    each: it stops every thread, so in a service it is a pause in every request."""
    empty = collection_ms()
    provider = MemoryProvider()
    await provider.create_meter(MeterCreate(event_name="api_calls", dimensions=["region"]))
    for offset in range(0, count, 10_000):
        await provider.ingest_batch(
            [
                UsageEvent(**row(i, count), dimensions={"region": ("eu", "us", "ap")[i % 3]})
                for i in range(offset, min(offset + 10_000, count))
            ]
        )
    stored = collection_ms()
    print(f"full gc.collect(), {count:,} events stored / none {stored:9.1f} ms / {empty:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"metering-core memory provider benchmark, {datetime.now(UTC):%Y-%m-%d}")
    asyncio.run(ingest_figures(min(args.events, 300_000)))
    asyncio.run(query_figures(args.events))
    asyncio.run(collection_figures(args.events))


if __name__ == "__main__":
    main()
