"""A drill: the service's store goes read-only under a client that keeps sending, then is
writable again. Dead letters are only for events refused as data: the client's spooled
events wait out the store's failure and are each counted once when it is fixed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from metering_core import AsyncMetering, Metering
from metering_core.server import create_app
from metering_core.testing.serving import serve_in_thread

KEYS = {"admin": {"scopes": ["meters:read", "meters:write", "usage:read", "usage:write"]}}
ADMIN = {"Authorization": "Bearer admin"}
START = datetime.now(UTC) - timedelta(hours=1)


def immutable(files: list[Path], on: bool) -> None:
    """Make the store's files unwritable even to root (which ignores file modes)."""
    for file in files:
        if file.exists():
            subprocess.run(["chattr", "+i" if on else "-i", str(file)], check=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "store.db"
    probe = tmp_path / "probe"
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("this file system cannot make a file immutable (chattr +i)")
    immutable([probe], on=False)
    yield path
    immutable([path, Path(f"{path}-wal"), Path(f"{path}-shm")], on=False)


def test_a_read_only_store_makes_no_dead_letter_and_loses_nothing(
    store: Path, tmp_path: Path
) -> None:
    service = AsyncMetering("sql", url=f"sqlite:///{store}")
    with serve_in_thread(create_app(service, keys=KEYS)) as url:
        http = httpx.Client(base_url=url, headers=ADMIN)
        meter = http.post("/meters", json={"event_name": "api_calls"}).json()
        client = Metering(
            "http",
            base_url=url,
            api_key="admin",
            spool_path=tmp_path / "spool.db",
            linger=0,
            retry_backoff=0.01,
            max_attempts=3,
            delivery_timeout=2,
        )
        sent = [f"e{i}" for i in range(30)]

        def send(ids: list[str]) -> None:
            client.ingest_usage_events(
                [
                    {"id": i, "event_name": "api_calls", "customer_id": "t1", "timestamp": START}
                    for i in ids
                ]
            )

        send(sent[:10])
        assert sorted(client.flush(timeout=10).accepted) == sorted(sent[:10])
        files = [store, Path(f"{store}-wal")]  # not -shm: it is mapped in memory
        immutable(files, on=True)
        try:
            send(sent[10:])  # acknowledged: committed to the client's spool
            refused = http.post(
                "/usage", json={"events": [{"event_name": "api_calls", "customer_id": "t1"}]}
            )
            assert refused.status_code == 503
            assert refused.headers["Retry-After"]
            assert refused.json()["error"]["type"] in (
                "configuration_error",
                "provider_unavailable",
            )
            health = http.get("/health")
            assert (health.status_code, health.json()["status"]) == (503, "degraded")
            with pytest.raises(TimeoutError):
                client.flush(timeout=1.5)  # past max_attempts: still waiting, not refused
            assert client.dead_letters() == []
        finally:
            immutable(files, on=False)
        report = client.flush(timeout=30)
        assert (sorted(report.accepted), report.rejected) == (sorted(sent[10:]), {})
        assert client.dead_letters() == []
        client.close()
        usage = http.get(
            f"/usage/{meter['id']}",
            params={"start": START.isoformat(), "end": (START + timedelta(hours=1)).isoformat()},
        ).json()
        assert [row["value"] for row in usage["rows"]] == ["30"]
        http.close()
