"""What a mirror costs the ledger's ingest, and how fast the forwarder feeds one.

    python benchmarks/bench_mirrors.py [--events N] [--postgres URL]

Ingest: batches of 500 into the sql store, with no mirror and with one (each stored
event then also owes the mirror an outbox row, in the same transaction). Forwarding:
the outbox of N events drained into the HTTP provider before a real metering service
(memory, on 127.0.0.1), against the same events delivered by the pipeline directly.
Reconcile: 1,000 customers x 31 days, the mirror an HTTP provider, and the fake Stripe
(through the real stripe SDK). Each mirror runs in a process of its own, as a billing
system is another machine: in this one it would charge its own work to the GIL measured.
`--postgres` names a server (a fresh database is made on it per run)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bench_http import KEY, start_service

from metering_core import AsyncMetering, CustomerCreate, MeterCreate, UsageEvent, Window
from metering_core.sql import SqlSettings
from metering_core.sql.provider import SqlProvider

BATCH = 500
START = datetime(2026, 11, 1, tzinfo=UTC)


@contextlib.contextmanager
def mirror_service() -> Iterator[str]:
    """`metering serve` over memory in its own process, with a `calls` meter; its URL."""
    process, url = start_service()
    try:
        asyncio.run(
            AsyncMetering("http", base_url=url, api_key=KEY).create_meter(event_name="calls")
        )
        yield url
    finally:
        process.terminate()
        process.wait()


def _serve_fake_stripe(key: str, urls: Any, stop: Any) -> None:
    from metering_stripe.testing import FakeStripe

    with FakeStripe(api_key=key) as fake:
        urls.put(fake.url)
        stop.wait()


@contextlib.contextmanager
def fake_stripe(key: str) -> Iterator[str]:
    """The fake Stripe in its own process; its URL."""
    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve_fake_stripe, args=(key, urls, stop))
    process.start()
    try:
        yield urls.get(timeout=60)
    finally:
        stop.set()
        process.join(10)


def events(count: int, run: str) -> list[UsageEvent]:
    return [
        UsageEvent(
            id=f"{run}-{i}",
            event_name="calls",
            customer_id=f"t{i % 1000}",
            value=Decimal(i % 7 + 1),
            timestamp=START + timedelta(seconds=i),
            dimensions={"region": ("eu", "us", "ap")[i % 3]},
        )
        for i in range(count)
    ]


def fresh(server: str | None) -> str:
    if server is None:
        return f"sqlite:///{tempfile.mkdtemp()}/ledger.db"
    import asyncpg

    name = f"bench_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        connection = await asyncpg.connect(server.rsplit("/", 1)[0] + "/postgres")
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    return f"{server.rsplit('/', 1)[0]}/{name}"


async def ingest_rate(url: str, mirrors: dict[str, Any], count: int) -> float:
    provider = SqlProvider(SqlSettings(url=url, mirrors=mirrors))
    await provider.create_meter(MeterCreate(event_name="calls"))
    sent = events(count, "i")
    began = time.perf_counter()
    for first in range(0, count, BATCH):
        await provider.ingest_usage_events(sent[first : first + BATCH])
    elapsed = time.perf_counter() - began
    await provider.aclose()
    return count / elapsed


async def forward_rate(url: str, mirror_url: str, count: int) -> tuple[float, float]:
    mirrors = {"billing": {"provider": "http", "base_url": mirror_url, "api_key": KEY}}
    provider = SqlProvider(SqlSettings(url=url, mirrors=mirrors))
    await provider.create_meter(MeterCreate(event_name="calls"))
    sent = events(count, "f")
    for first in range(0, count, BATCH):
        await provider.ingest_usage_events(sent[first : first + BATCH])
    del sent  # the writers' events: a forwarder (`metering mirror run`) holds none of them
    began = time.perf_counter()
    await provider.flush_mirrors()
    forwarded = count / (time.perf_counter() - began)
    await provider.aclose()
    async with AsyncMetering("http", base_url=mirror_url, api_key=KEY) as direct:
        again = events(count, "d")
        began = time.perf_counter()
        for first in range(0, count, BATCH):
            await direct.ingest_usage_events(again[first : first + BATCH])
        await direct.flush()
        delivered = count / (time.perf_counter() - began)
    return forwarded, delivered


async def reconcile_time(url: str, mirror_url: str, customers: int, days: int) -> float:
    """Seconds to reconcile `customers` x `days` daily cells, every one equal."""
    mirrors = {"billing": {"provider": "http", "base_url": mirror_url, "api_key": KEY}}
    return await timed_reconcile(url, mirrors, START, customers, days)


async def reconcile_stripe_time(url: str, customers: int, days: int) -> float:
    """Seconds to reconcile `customers` x `days` daily cells against the fake Stripe
    (the real stripe SDK over HTTP; Stripe answers one customer at a time), every one
    equal. The days end yesterday: Stripe takes events at most 35 days old, and none in
    the future (today's first hour, where the events are, is still ahead after midnight)."""
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start -= timedelta(days=days)
    key = "sk_test_bench"
    with fake_stripe(key) as url_of_stripe:
        mirrors = {"billing": {"provider": "stripe", "api_key": key, "base_url": url_of_stripe}}
        return await timed_reconcile(url, mirrors, start, customers, days, stripe=True)


async def timed_reconcile(
    url: str,
    mirrors: dict[str, Any],
    start: datetime,
    customers: int,
    days: int,
    *,
    stripe: bool = False,
) -> float:
    """An event a customer a day from `start`, forwarded to the mirror; the seconds to
    reconcile them by day, every cell equal. Stripe takes usage only of its customers."""
    provider = SqlProvider(SqlSettings(url=url, mirrors=mirrors))
    await provider.create_meter(MeterCreate(event_name="calls"))
    if stripe:
        for c in range(customers):
            await provider.create_customer(CustomerCreate(id=f"t{c}"))
    cells = [
        UsageEvent(
            id=f"r-{c}-{d}",
            event_name="calls",
            customer_id=f"t{c}",
            value=Decimal(c % 7 + 1),
            timestamp=start + timedelta(days=d, minutes=c % 60),  # in its first hour
        )
        for c in range(customers)
        for d in range(days)
    ]
    for first in range(0, len(cells), BATCH):
        await provider.ingest_usage_events(cells[first : first + BATCH])
    await provider.flush_mirrors()
    began = time.perf_counter()
    report = await provider.reconcile(
        "billing", start=start, end=start + timedelta(days=days), window=Window.DAY
    )
    elapsed = time.perf_counter() - began
    assert report.ok
    assert len(report.cells) == customers * days, len(report.cells)
    await provider.aclose()
    return elapsed


def run(label: str, server: str | None, count: int) -> None:
    down = {"billing": {"provider": "http", "base_url": "http://127.0.0.1:9", "api_key": KEY}}
    plain, mirrored = 0.0, 0.0
    for _ in range(3):  # in turns, the best of three each: the figures move run to run
        plain = max(plain, asyncio.run(ingest_rate(fresh(server), {}, count)))
        mirrored = max(mirrored, asyncio.run(ingest_rate(fresh(server), down, count)))
    print(
        f"{label} ingest, batches of {BATCH}: no mirror {plain:,.0f} events/s, one mirror "
        f"{mirrored:,.0f} events/s (cost {100 * (1 - mirrored / plain):.0f} %)"
    )
    forwarded, delivered, by_cli = 0.0, 0.0, 0.0
    with mirror_service() as mirror_url:
        for _ in range(3):  # in turns, the best of three each, as above
            rates = asyncio.run(forward_rate(fresh(server), mirror_url, count))
            forwarded, delivered = max(forwarded, rates[0]), max(delivered, rates[1])
            by_cli = max(by_cli, cli_forward_rate(fresh(server), mirror_url, count))
    with mirror_service() as mirror_url:
        took = asyncio.run(reconcile_time(fresh(server), mirror_url, 1000, 31))
    print(f"{label} reconcile of 1,000 customers x 31 days, all equal: {took:.2f} s")
    took = asyncio.run(reconcile_stripe_time(fresh(server), 1000, 31))
    print(f"{label} reconcile of 1,000 customers x 31 days against the fake Stripe: {took:.2f} s")
    print(
        f"{label} forwarder into the HTTP provider: {forwarded:,.0f} events/s in-process, "
        f"{by_cli:,.0f} events/s as `metering mirror run --once` (past its start); the "
        f"pipeline delivering the same directly {delivered:,.0f} events/s "
        f"({forwarded / delivered:.2f}x, {by_cli / delivered:.2f}x)"
    )


def cli_forward_rate(url: str, mirror_url: str, count: int) -> float:
    """`metering mirror run --once` over `count` owed events, by its own account of the
    rows it settled and the seconds it took, past its start (the meter's change is one
    row of them). Subtracting a run with nothing owed from one with all of it, as before,
    moved the figure by a tenth with the start's own spread."""
    mirrors = {"billing": {"provider": "http", "base_url": mirror_url, "api_key": KEY}}

    async def owe() -> None:
        provider = SqlProvider(SqlSettings(url=url, mirrors=mirrors))
        await provider.create_meter(MeterCreate(event_name="calls"))
        sent = events(count, "c")
        for first in range(0, count, BATCH):
            await provider.ingest_usage_events(sent[first : first + BATCH])
        await provider.aclose()

    asyncio.run(owe())
    command = [sys.executable, "-m", "metering_core.cli", "mirror", "run", "--once"]
    env = {
        **os.environ,
        "METERING_PROVIDER": "sql",
        "METERING_SQL_URL": url,
        "METERING_SQL_MIRRORS": json.dumps(mirrors),
    }
    said = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stderr
    found = re.search(r"([\d,]+) row\(s\) settled in ([\d.]+) s", said)
    assert found is not None, said
    settled, took = int(found[1].replace(",", "")), float(found[2])
    assert settled == count + 1, said
    return count / took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--postgres")
    options = parser.parse_args()
    print(f"metering-core mirrors benchmark, {datetime.now(UTC):%Y-%m-%d}")
    run("sqlite", None, options.events)
    if options.postgres:
        run("postgres", options.postgres, options.events)


if __name__ == "__main__":
    main()
