"""An SQLite store checkpoints in a thread of its own: what is stored reaches the database
file with no writer waiting for the copy, two processes' threads share the file, and a
closed store leaves no thread and no log behind."""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metering_core import AsyncMetering
from metering_core.sql.checkpoints import Checkpoints

AT = datetime(2026, 11, 2, 10, tzinfo=UTC)
THREAD = "metering-sqlite-checkpoints"


def batch(prefix: str, count: int) -> list[dict[str, object]]:
    return [
        {"id": f"{prefix}{n}", "event_name": "calls", "customer_id": "acme", "value": 1}
        | {"timestamp": AT}
        for n in range(count)
    ]


def in_the_file(path: Path) -> int:
    """Events in the database file itself, the log ignored (as if read from a copy of
    the file alone): what a checkpoint has copied there."""
    reader = sqlite3.connect(f"{path.as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        (count,) = reader.execute("SELECT count(*) FROM events").fetchone()
        return int(count)
    except sqlite3.DatabaseError:  # no table yet, or a page the thread is writing
        return -1
    finally:
        reader.close()


async def eventually_in_the_file(path: Path, count: int) -> int:
    for _ in range(100):
        found = in_the_file(path)
        if found == count:
            break
        await asyncio.sleep(0.05)
    return found


async def test_stored_events_reach_the_database_file_with_no_writer_checkpointing(
    tmp_path: Path,
) -> None:
    """Far fewer pages than a writer's own checkpoint waits for: only the store's thread
    copies them into the file."""
    path = tmp_path / "usage.db"
    metering = AsyncMetering(provider="sql", url=f"sqlite:///{path}")
    try:
        await metering.create_meter({"event_name": "calls", "aggregation": "sum"})
        await metering.ingest_usage_events(batch("a", 300))
        assert await eventually_in_the_file(path, 300) == 300
        await metering.ingest_usage_events(batch("b", 200))
        assert await eventually_in_the_file(path, 500) == 500
    finally:
        await metering.close()


async def test_two_stores_on_one_file_checkpoint_it_side_by_side(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes' stores (here two in one process): one thread's checkpoint finds the
    other's running and leaves it the work, with nothing reported and nothing lost."""
    path = tmp_path / "usage.db"
    url = f"sqlite:///{path}"
    first, second = AsyncMetering(provider="sql", url=url), AsyncMetering(provider="sql", url=url)
    try:
        await first.create_meter({"event_name": "calls", "aggregation": "sum"})
        with caplog.at_level(logging.WARNING, logger="metering_core.sql"):
            for round_ in range(20):
                await asyncio.gather(
                    first.ingest_usage_events(batch(f"f{round_}-", 50)),
                    second.ingest_usage_events(batch(f"s{round_}-", 50)),
                )
            assert await eventually_in_the_file(path, 2_000) == 2_000
        assert "checkpoint" not in caplog.text
    finally:
        await first.close()
        await second.close()


async def test_a_closed_store_leaves_no_thread_and_no_log(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    metering = AsyncMetering(provider="sql", url=f"sqlite:///{path}")
    await metering.create_meter({"event_name": "calls", "aggregation": "sum"})
    await metering.ingest_usage_events(batch("a", 100))
    assert THREAD in {thread.name for thread in threading.enumerate()}
    await metering.close()
    assert THREAD not in {thread.name for thread in threading.enumerate()}
    assert not path.with_name(f"{path.name}-wal").exists()  # all of it in the file
    assert in_the_file(path) == 100


async def test_a_store_dropped_unclosed_ends_its_thread(tmp_path: Path) -> None:
    """Scripts forget `close()`: their stores' threads, each with the file open, must
    not pile up for the life of the process."""
    for n in range(3):
        metering = AsyncMetering(provider="sql", url=f"sqlite:///{tmp_path / f'{n}.db'}")
        await metering.create_meter({"event_name": "calls", "aggregation": "sum"})
        del metering
    gc.collect()
    for _ in range(40):
        if THREAD not in {thread.name for thread in threading.enumerate()}:
            break
        await asyncio.sleep(0.05)
    assert THREAD not in {thread.name for thread in threading.enumerate()}


def test_a_failing_checkpoint_is_reported_once_per_outage_and_so_is_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk failing now and then: each outage is one warning, however many intervals
    it lasts, and each recovery is said; a second outage is not lost for having the
    same message as the first."""
    script = ["fail", "fail", "fail", "ok", "ok", "fail", "fail", "ok"]
    done = threading.Event()

    class Flaky:
        def execute(self, statement: str) -> Flaky:
            step = script.pop(0) if script else "ok"
            if not script:
                done.set()
            if step == "fail":
                raise sqlite3.OperationalError("disk I/O error")
            return self

        def fetchone(self) -> tuple[int, int, int]:
            return (0, 0, 0)

        def close(self) -> None:
            pass

    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: Flaky())
    with caplog.at_level(logging.WARNING, logger="metering_core.sql"):
        checkpoints = Checkpoints(tmp_path / "usage.db", every=0.001).start()
        assert done.wait(5)
        checkpoints.stop()
    said = [record.getMessage().rsplit(": ", 1)[-1] for record in caplog.records]
    recovered = f"SQLite checkpoints of {tmp_path / 'usage.db'} work again"
    assert said == ["disk I/O error", recovered] * 2
