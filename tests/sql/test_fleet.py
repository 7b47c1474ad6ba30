"""`metering serve` on the store, as a fleet runs it: restarted, doubled on one PostgreSQL,
and killed mid-ingest, with app clients on the HTTP provider."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from metering_core import Metering

pytest.importorskip("metering_http")

KEY = "fleet-key"
SCOPES = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]
AT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(store_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERING_")},
        "METERING_PROVIDER": "sql",
        "METERING_SQL_URL": store_url,
        "METERING_KEYS": json.dumps({KEY: {"scopes": SCOPES}}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "metering_core.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = process.stdout.read().decode() if process.stdout else ""
            raise RuntimeError(f"metering serve did not start:\n{output}")
        time.sleep(0.05)


@contextmanager
def serving(store_url: str, port: int | None = None) -> Iterator[str]:
    port = port or free_port()
    process = start(store_url, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def client(url: str, **options: object) -> Metering:
    return Metering("http", base_url=url, api_key=KEY, linger=0.001, **options)


def total(url: str, meter_id: str) -> Decimal:
    with client(url) as m:
        usage = m.fetch_usage(meter_id, start=AT - timedelta(days=1), end=AT + timedelta(days=1))
        return usage.total


def test_a_restarted_service_answers_the_same_totals(sqlite_url: str) -> None:
    port = free_port()
    with serving(sqlite_url, port) as url, client(url) as m:
        meter = m.create_meter(event_name="api_calls")
        m.ingest_usage_events(
            [{"event_name": "api_calls", "customer_id": "t1", "value": 2, "timestamp": AT}] * 1
            + [
                {"id": f"e{i}", "event_name": "api_calls", "customer_id": "t1", "timestamp": AT}
                for i in range(99)
            ]
        )
        assert m.flush().ok
        before = total(url, meter.id)
    with serving(sqlite_url, port) as url:
        assert total(url, meter.id) == before == Decimal(101)


def test_two_services_on_one_postgres_count_each_event_once(postgres_url: str) -> None:
    pool = [f"order-{i}" for i in range(3000)]
    with serving(postgres_url) as first, serving(postgres_url) as second:
        with client(first) as admin:
            meter = admin.create_meter(event_name="api_calls")
        reports: list[tuple[list[str], list[str]]] = []
        failures: list[BaseException] = []

        def app_server(n: int) -> None:
            try:
                send(n)
            except BaseException as exc:
                failures.append(exc)

        def send(n: int) -> None:
            picked = random.Random(n).sample(pool, 1200)  # overlaps with the others
            with client(first if n % 2 else second) as m:
                m.ingest_usage_events(
                    {
                        "id": i,
                        "event_name": "api_calls",
                        "customer_id": f"t{int(i[6:]) % 7}",
                        "timestamp": AT,
                    }
                    for i in picked
                )
                report = m.flush(timeout=120)
                assert report.ok, report.rejected
                reports.append((report.accepted, report.duplicates))

        threads = [threading.Thread(target=app_server, args=(n,)) for n in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert failures == []
        accepted = [i for a, _ in reports for i in a]
        sent = {i for n in range(10) for i in random.Random(n).sample(pool, 1200)}
        assert len(reports) == 10
        assert sorted(accepted) == sorted(sent), "an event was accepted twice, or not at all"
        assert sum(len(d) for _, d in reports) == 10 * 1200 - len(sent)
        assert total(first, meter.id) == total(second, meter.id) == Decimal(len(sent))


@pytest.mark.parametrize("store", ["sqlite_url", "postgres_url"])
def test_a_service_killed_mid_ingest_loses_no_acknowledged_event(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Four app servers send at once, so the service is killed while groups of their
    requests share a transaction: nothing a client was told is stored is lost."""
    store_url: str = request.getfixturevalue(store)
    port = free_port()
    process = start(store_url, port)
    url = f"http://127.0.0.1:{port}"
    with client(url) as admin:
        meter = admin.create_meter(event_name="api_calls")
    acknowledged: list[str] = []
    stop = threading.Event()

    def app_server(name: str) -> None:
        with client(url, spool_path=tmp_path / f"{name}.db", retry_backoff=0.02) as m:
            n = 0
            while not stop.is_set():
                batch = [
                    {
                        "id": f"{name}-{n + i}",
                        "event_name": "api_calls",
                        "customer_id": "t1",
                        "timestamp": AT,
                    }
                    for i in range(5)
                ]
                acknowledged.extend(m.ingest_usage_events(batch))
                n += 5
                time.sleep(0.002)
            assert m.flush(timeout=120).ok

    senders = [threading.Thread(target=app_server, args=(f"s{n}",)) for n in range(4)]
    for sender in senders:
        sender.start()
    time.sleep(1.5)
    os.kill(process.pid, signal.SIGKILL)  # mid-ingest: requests in flight are cut
    process.wait(10)
    time.sleep(0.5)
    process = start(store_url, port)
    time.sleep(1.0)
    stop.set()
    for sender in senders:
        sender.join(180)
    try:
        assert len(acknowledged) > 100
        assert total(url, meter.id) == Decimal(len(set(acknowledged)))
    finally:
        process.terminate()
        process.wait(10)
