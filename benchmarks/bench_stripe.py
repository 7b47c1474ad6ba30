"""Stripe figures against the fake Stripe with 2 ms added per request: batched ingestion
through the v2 meter event stream versus one v1 meter event request per event.

Run: python benchmarks/bench_stripe.py
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

from metering_stripe import StripeProvider, StripeSettings
from metering_stripe.testing import FakeStripe

from metering_core import CustomerCreate, MeterCreate, UsageEvent

KEY = "sk_test_bench"
EVENTS = 2000
LATENCY = 0.002


def show(label: str, figure: str) -> None:
    print(f"{label:<58}{figure}")


async def ingest(fake: FakeStripe, stream: bool, count: int) -> float:
    provider = StripeProvider(
        StripeSettings(api_key=KEY, base_url=fake.url, use_event_stream=stream)
    )  # type: ignore[arg-type]
    name = f"bench_{uuid.uuid4().hex[:8]}"
    await provider.create_meter(MeterCreate(event_name=name))
    await provider.create_customer(CustomerCreate(id="acme"))
    events = [UsageEvent(event_name=name, customer_id="acme") for _ in range(count)]
    began = time.perf_counter()
    for offset in range(0, count, 100):
        result = await provider.ingest_usage_events(events[offset : offset + 100])
        assert not result.rejected, result.rejected
    return time.perf_counter() - began


def main() -> None:
    added = f"+{LATENCY * 1000:.0f} ms a request"
    print(f"metering-core Stripe benchmark (fake Stripe, {added}), {datetime.now(UTC):%Y-%m-%d}")
    with FakeStripe(api_key=KEY, latency=LATENCY) as fake:
        streamed = asyncio.run(ingest(fake, True, EVENTS))
        single = asyncio.run(ingest(fake, False, EVENTS // 10)) * 10
    show(f"{EVENTS:,} events, one v1 request each (1/10 timed)", f"{single:7.2f} s")
    show(
        f"{EVENTS:,} events, v2 stream, batches of 100",
        f"{streamed:7.2f} s   = {single / streamed:,.0f}x faster",
    )


if __name__ == "__main__":
    main()
