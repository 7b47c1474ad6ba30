"""A service process on memory and an app using METERING_PROVIDER=http behave like memory itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from metering_core import Metering, NotFoundError

KEY = "two-process-key"
SCOPES = ["meters:read", "meters:write", "usage:read", "usage:write", "customers:write"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERING_")},
        "METERING_PROVIDER": "memory",
        "METERING_KEYS": json.dumps({KEY: {"scopes": SCOPES}}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "metering_core.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read().decode() if process.stdout else ""
                raise RuntimeError(f"metering serve did not start:\n{output}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def scenario(m: Metering) -> dict[str, Any]:
    """Everything a billing app does, reduced to comparable values (ids differ by provider)."""
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    meter = m.create_meter(event_name="api_calls", dimensions=["region"])
    m.create_customer(id="acme", name="Acme")
    events = [
        {
            "id": f"e{i}",
            "event_name": "api_calls",
            "customer_id": ["acme", "globex"][i % 2],
            "value": i,
            "timestamp": start + timedelta(hours=5 * i),
            "dimensions": {"region": ["eu", "us"][i % 3 % 2]},
        }
        for i in range(12)
    ]
    m.ingest_usage_events(events)
    m.ingest_usage_events(events[:4])
    m.ingest_usage_event(event_name="unmetered", customer_id="acme")
    report = m.flush()
    cancel = m.cancel_usage_events(["e3", "missing"])
    usage = m.fetch_usage(
        meter.id,
        start=start,
        end=start + timedelta(days=3),
        window="day",
        group_by=["customer_id", "region"],
        tz="Europe/Paris",
    )
    try:
        m.fetch_meter("mtr_missing")
        missing = "found"
    except NotFoundError:
        missing = "not found"
    return {
        "accepted": sorted(report.accepted),
        "duplicates": sorted(report.duplicates),
        "rejected": len(report.rejected),
        "cancel": (cancel.cancelled, cancel.not_found),
        "rows": [(r.start, r.end, r.customer_id, r.dimensions, r.value) for r in usage.rows],
        "meters": [x.event_name for x in m.iter_meters()],
        "missing": missing,
    }


def test_the_http_provider_behaves_like_memory(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Metering("memory") as direct:
        expected = scenario(direct)
    monkeypatch.setenv("METERING_PROVIDER", "http")
    monkeypatch.setenv("METERING_HTTP_BASE_URL", service)
    monkeypatch.setenv("METERING_HTTP_API_KEY", KEY)
    with Metering() as remote:
        assert remote.provider_name == "http"
        assert scenario(remote) == expected
    assert expected["rows"]
    assert expected["duplicates"] == ["e0", "e1", "e2", "e3"]
