"""Pipeline figures: events/s into memory (sync facade, one at a time and in batches), with
the SQLite spool, and against a provider that takes 5 ms per call versus one call per event.

Run: python benchmarks/bench_pipeline.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from metering_core import IngestResult, Metering, UsageEvent
from metering_core.memory import MemoryProvider


def events(count: int) -> list[UsageEvent]:
    return [
        UsageEvent(event_name="api_calls", customer_id=f"t{i % 50}", value=1) for i in range(count)
    ]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} events/s"


def show(label: str, figure: str) -> None:
    print(f"{label:<54}{figure}")


def one_at_a_time(m: Metering, batch: list[UsageEvent]) -> float:
    began = time.perf_counter()
    for event in batch:
        m.ingest_usage_event(event)
    report = m.flush()
    assert len(report.accepted) == len(batch), report.rejected
    return time.perf_counter() - began


def into_memory(count: int) -> None:
    batch = events(count)
    with Metering("memory") as m:
        m.create_meter(event_name="api_calls")
        show("sync facade, one event at a time, into memory", rate(count, one_at_a_time(m, batch)))
    batch = events(count)
    with Metering("memory") as m:
        m.create_meter(event_name="api_calls")
        began = time.perf_counter()
        for offset in range(0, count, 1000):
            m.ingest_usage_events(batch[offset : offset + 1000])
        m.flush()
        show("sync facade, batches of 1,000, into memory", rate(count, time.perf_counter() - began))
    with tempfile.TemporaryDirectory() as folder:
        batch = events(count // 2)
        with Metering("memory", spool_path=Path(folder) / "spool.db") as m:
            m.create_meter(event_name="api_calls")
            spooled = one_at_a_time(m, batch)
            show(
                "sync facade, one at a time, spool on (WAL commit each)", rate(len(batch), spooled)
            )


class SlowProvider(MemoryProvider):
    """Memory that takes 5 ms per call, like a provider across a network."""

    async def ingest_usage_events(self, batch: Sequence[UsageEvent]) -> IngestResult:
        await asyncio.sleep(0.005)
        return await super().ingest_usage_events(batch)


def against_slow_provider(count: int) -> None:
    batch = events(count)
    direct = SlowProvider()

    async def one_call_per_event() -> float:
        from metering_core import MeterCreate

        await direct.create_meter(MeterCreate(event_name="api_calls"))
        began = time.perf_counter()
        for event in batch[:200]:
            await direct.ingest_usage_events([event])
        return (time.perf_counter() - began) / 200

    per_event = asyncio.run(one_call_per_event())
    with Metering(SlowProvider()) as m:
        m.create_meter(event_name="api_calls")
        piped = one_at_a_time(m, batch) / count
    show("5 ms provider, one direct call per event", rate(1, per_event))
    show("5 ms provider, through the pipeline", f"{rate(1, piped)}   = {per_event / piped:,.0f}x")


def main() -> None:
    print(f"metering-core pipeline benchmark, {datetime.now(UTC):%Y-%m-%d}")
    into_memory(200_000)
    against_slow_provider(50_000)


if __name__ == "__main__":
    main()
