"""HTTP figures over loopback, service in its own process (`metering serve` on memory):
10,000 events batched versus one request per event, and the HTTP provider versus a
hand-written httpx loop posting the same batches.

Run: python benchmarks/bench_http.py
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
from metering_http import HttpProvider, HttpSettings

from metering_core import Meter, MeterCreate, Metering, UsageEvent

KEY = "bench-key"
SCOPES = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]
EVENTS = 10_000
BATCH = 500


def show(label: str, figure: str) -> None:
    print(f"{label:<56}{figure}")


def start_service() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "METERING_PROVIDER": "memory",
        "METERING_KEYS": json.dumps({KEY: {"scopes": SCOPES}}),
    }
    command = [sys.executable, "-m", "metering_core.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("service did not start")


def fresh(count: int, event_name: str) -> list[UsageEvent]:
    return [
        UsageEvent(id=str(uuid.uuid4()), event_name=event_name, customer_id=f"t{i % 20}")
        for i in range(count)
    ]


async def measure(url: str) -> None:
    provider = HttpProvider(HttpSettings(base_url=url, api_key=KEY))
    names = ["batched", "single", "handwritten"]
    for name in names:
        await provider.create_meter(MeterCreate(event_name=f"bench_{name}_{uuid.uuid4().hex[:6]}"))
    meters = {m.event_name.split("_")[1]: m.event_name async for m in _all(provider)}

    singles = fresh(1000, meters["single"])
    began = time.perf_counter()
    for event in singles:
        await provider.ingest_batch([event])
    single = (time.perf_counter() - began) / len(singles) * EVENTS

    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}
    ) as client:

        async def by_provider() -> float:
            events = fresh(EVENTS, meters["batched"])
            began = time.perf_counter()
            for offset in range(0, EVENTS, BATCH):
                await provider.ingest_batch(events[offset : offset + BATCH])
            return time.perf_counter() - began

        async def by_hand() -> float:
            events = fresh(EVENTS, meters["handwritten"])
            began = time.perf_counter()
            for offset in range(0, EVENTS, BATCH):
                body = {
                    "events": [e.model_dump(mode="json") for e in events[offset : offset + BATCH]]
                }
                response = await client.post("/usage", json=body)
                response.raise_for_status()
                assert not response.json()["rejected"]  # a client must read each event's fate
            return time.perf_counter() - began

        runs = [(await by_provider(), await by_hand()) for _ in range(5)]  # interleaved, best of 5
    batched, handwritten = min(r[0] for r in runs), min(r[1] for r in runs)
    await provider.aclose()

    show(f"{EVENTS:,} events, one request per event (1,000 timed)", f"{single:8.2f} s")
    show(
        f"{EVENTS:,} events, batches of {BATCH} (HTTP provider)",
        f"{batched:8.2f} s   = {single / batched:,.0f}x faster",
    )
    show(
        f"{EVENTS:,} events, batches of {BATCH} (hand-written httpx)",
        f"{handwritten:8.2f} s   provider/hand = {batched / handwritten:.2f}",
    )


async def _all(provider: HttpProvider) -> AsyncIterator[Meter]:
    cursor = None
    while True:
        page = await provider.fetch_all_meters(limit=100, cursor=cursor)
        for meter in page.items:
            yield meter
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def through_the_pipeline(url: str) -> None:
    with Metering("http", base_url=url, api_key=KEY) as m:
        name = f"bench_pipeline_{uuid.uuid4().hex[:6]}"
        m.create_meter(event_name=name)
        began = time.perf_counter()
        for event in fresh(EVENTS, name):
            m.ingest_usage_event(event)
        report = m.flush()
        elapsed = time.perf_counter() - began
    assert len(report.accepted) == EVENTS, report.rejected
    show(
        f"{EVENTS:,} events one at a time through the pipeline",
        f"{elapsed:8.2f} s   = {EVENTS / elapsed:,.0f} events/s",
    )


def main() -> None:
    print(f"metering-core HTTP benchmark, {datetime.now(UTC):%Y-%m-%d}")
    process, url = start_service()
    try:
        asyncio.run(measure(url))
        through_the_pipeline(url)
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
