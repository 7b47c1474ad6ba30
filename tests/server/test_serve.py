"""serve(): what `metering serve` and embedding apps call; loopback unless told otherwise."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from metering_core import AsyncMetering, ConfigurationError
from metering_core.server import create_app, serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    return calls


def test_serve_builds_the_app_and_binds_loopback(runs: list[tuple[Any, dict[str, Any]]]) -> None:
    serve(AsyncMetering("memory"), allow_anonymous=True)
    app, options = runs[0]
    assert isinstance(app, FastAPI)
    assert options == {"host": "127.0.0.1", "port": 8000}


def test_serve_runs_a_given_app_as_is(runs: list[tuple[Any, dict[str, Any]]]) -> None:
    app = create_app(AsyncMetering("memory"), keys={"k": {"scopes": ["meters:read"]}})
    serve(app, host="0.0.0.0", port=9000)
    assert runs == [(app, {"host": "0.0.0.0", "port": 9000})]


def test_serve_without_keys_refuses(
    runs: list[tuple[Any, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METERING_KEYS", raising=False)
    with pytest.raises(ConfigurationError, match="no API keys"):
        serve(AsyncMetering("memory"))
    assert runs == []


def test_metering_serve_logs_as_asked_and_uvicorn_keeps_to_it(tmp_path: Any) -> None:
    """`--log-json` reaches uvicorn's own loggers too (access lines included), and
    `--log-level warning` silences the per-request lines a busy service cannot afford."""
    key = "log-test-key-do-not-print"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METERING_")},
        "METERING_PROVIDER": "memory",
        "METERING_KEYS": json.dumps({key: {"scopes": ["meters:read"]}}),
    }

    def lines(*options: str) -> list[str]:
        port = free_port()
        command = [sys.executable, "-m", "metering_core.cli", "serve", "--port", str(port)]
        process = subprocess.Popen(
            [*command, *options], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/meters", headers={"authorization": key})
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "metering serve did not start"
                    time.sleep(0.05)
        finally:
            process.terminate()
            _, err = process.communicate(timeout=10)
        return err.decode().splitlines()

    records = [json.loads(line) for line in lines("--log-json")]
    assert {"uvicorn.error", "uvicorn.access"} <= {r["logger"] for r in records}
    assert any("GET /meters" in r["message"] and "401" in r["message"] for r in records)
    quiet = lines("--log-level", "warning")
    assert not [line for line in quiet if "GET /meters" in line]
    assert not [line for line in [*quiet, *map(str, records)] if key in line]


def test_the_running_service_eases_the_collector_and_gives_it_back() -> None:
    """While the app runs, what existed at its start is frozen out of collections and
    young ones come every 10,000 allocations (its p99 and its throughput, see
    benchmarks/README.md); once it stops, an embedding process has its collector as it
    had it."""
    from fastapi.testclient import TestClient

    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    with TestClient(create_app(AsyncMetering("memory"), allow_anonymous=True)) as client:
        assert client.get("/health").status_code == 200
        assert gc.get_threshold()[0] == 10_000
        assert gc.get_freeze_count() > frozen
    assert gc.get_threshold() == before
    if not frozen:  # what a caller had frozen stays frozen (CPython cannot unfreeze part)
        assert gc.get_freeze_count() == 0
