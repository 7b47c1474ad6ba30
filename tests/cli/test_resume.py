"""A backfill killed mid-delivery and run again counts every row exactly once.

The service is real (the REST app over memory, reached by the HTTP provider) so its state
outlives the killed `metering ingest` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("metering_http")
pytest.importorskip("uvicorn")

from metering_core import AsyncMetering
from metering_core.server import create_app
from metering_core.testing.serving import serve_in_thread

ROWS = 12_000


class FailAfter:
    """ASGI wrapper: after `allowed` usage posts, answer 503 while `failing` is set."""

    def __init__(self, app: Any, allowed: int) -> None:
        self.app, self.allowed, self.posts = app, allowed, 0
        self.failing = True
        self.refused = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/usage":
            self.posts += 1
            if self.failing and self.posts > self.allowed:
                self.refused.set()
                await send({"type": "http.response.start", "status": 503, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


@pytest.fixture
def service() -> Iterator[tuple[FailAfter, dict[str, str]]]:
    app = FailAfter(create_app(AsyncMetering("memory"), allow_anonymous=True), allowed=2)
    with serve_in_thread(app) as url:
        yield app, {**os.environ, "METERING_HTTP_BASE_URL": url}


def metering(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    script = Path(sys.executable).with_name("metering")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "metering_core.cli"]
    return subprocess.Popen(
        [*argv, "--provider", "http", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    return stdout


def test_a_killed_backfill_resumes_without_duplicates(
    service: tuple[FailAfter, dict[str, str]], tmp_path: Path
) -> None:
    app, env = service
    created = finish(metering(env, "meters", "create", "api_calls", "--format", "json"))
    meter_id = json.loads(created)[0]["id"]
    rows = tmp_path / "usage.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {
                    "event_name": "api_calls",
                    "customer_id": f"t{i % 3}",
                    "value": i % 5 + 1,
                    "timestamp": f"2026-11-{i % 28 + 1:02d}T10:00:00Z",
                }
            )
            + "\n"
            for i in range(ROWS)
        )
    )
    spool = str(tmp_path / "spool.db")
    first = metering(env, "ingest", str(rows), "--spool", spool)
    assert app.refused.wait(30), "the first run never reached the failing service"
    first.send_signal(signal.SIGKILL)  # mid-backfill: part delivered, part in the spool
    first.wait(10)
    app.failing = False
    report = finish(metering(env, "ingest", str(rows), "--spool", spool)).strip()
    duplicates = int(report.split("duplicates ")[1].split(",")[0].replace(",", ""))
    assert duplicates > 0  # the first run delivered part of the file
    usage = json.loads(
        finish(
            metering(
                env,
                "usage",
                meter_id,
                "--from",
                "2026-11-01T00:00:00Z",
                "--to",
                "2026-12-01T00:00:00Z",
                "--format",
                "json",
            )
        )
    )
    total = sum(Decimal(row["value"]) for row in usage["rows"])
    assert total == sum(i % 5 + 1 for i in range(ROWS))
