"""An SQLite store checkpoints in a thread of its own: what is stored reaches the database
file with no writer waiting for the copy, two processes' threads share the file, and a
closed store leaves no thread and no log behind."""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
import weakref
from datetime import UTC, datetime
from pathlib import Path

import pytest

from metering_core import AsyncMetering, UsageEvent
from metering_core.sql.checkpoints import RECOVERED_AFTER, Checkpoints
from metering_core.sql.provider import SqlProvider
from tests.forks import said_in_a_child

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


async def test_a_store_at_rest_cuts_its_log_file_to_nothing_while_open(tmp_path: Path) -> None:
    """Starting the log over reuses its file at the size it reached (up to 160 MB under
    load); at rest the thread cuts it, and what was stored stays readable."""
    path = tmp_path / "usage.db"
    log = tmp_path / "usage.db-wal"
    metering = AsyncMetering(provider="sql", url=f"sqlite:///{path}")
    try:
        await metering.create_meter({"event_name": "calls", "aggregation": "sum"})
        await metering.ingest_usage_events(batch("a", 2000))
        assert log.stat().st_size > 0
        for _ in range(100):
            if log.stat().st_size == 0:
                break
            await asyncio.sleep(0.05)
        assert log.stat().st_size == 0
        assert in_the_file(path) == 2000
        await metering.ingest_usage_events(batch("b", 10))  # the cut log takes writes again
        assert await eventually_in_the_file(path, 2010) == 2010
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


def checkpointing() -> set[threading.Thread]:
    """The stores' checkpoint threads running now (other tests' unclosed stores too)."""
    return {thread for thread in threading.enumerate() if thread.name == THREAD}


async def test_a_closed_store_leaves_no_thread_and_no_log(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    before = checkpointing()
    metering = AsyncMetering(provider="sql", url=f"sqlite:///{path}")
    await metering.create_meter({"event_name": "calls", "aggregation": "sum"})
    await metering.ingest_usage_events(batch("a", 100))
    ours = checkpointing() - before
    assert len(ours) == 1
    await metering.close()
    assert not any(thread.is_alive() for thread in ours)
    assert not path.with_name(f"{path.name}-wal").exists()  # all of it in the file
    assert in_the_file(path) == 100


async def test_a_store_dropped_unclosed_ends_its_thread(tmp_path: Path) -> None:
    """Scripts forget `close()`: their stores' threads, each with the file open, must
    not pile up for the life of the process."""
    before, ours = checkpointing(), set()
    for n in range(3):
        metering = AsyncMetering(provider="sql", url=f"sqlite:///{tmp_path / f'{n}.db'}")
        await metering.create_meter({"event_name": "calls", "aggregation": "sum"})
        ours |= checkpointing() - before
        del metering
    assert len(ours) == 3
    gc.collect()
    for _ in range(40):
        if not any(thread.is_alive() for thread in ours):
            break
        await asyncio.sleep(0.05)
    assert not any(thread.is_alive() for thread in ours)


async def test_a_forked_child_never_touches_the_parents_thread(tmp_path: Path) -> None:
    """gunicorn --preload: the child makes its own store and thread, and at its exit
    does not stop the parent's, whose stop flag's lock it may have copied held (here
    held on purpose): stopping it would wait on that lock for ever."""
    path = tmp_path / "usage.db"
    metering = AsyncMetering(provider="sql", url=f"sqlite:///{path}")
    try:
        await metering.create_meter({"event_name": "calls", "aggregation": "sum"})
        provider = metering.provider
        assert isinstance(provider, SqlProvider)
        parents = provider._checkpoints
        assert parents is not None

        def in_the_child() -> str:
            parents._stopping._cond.acquire()  # type: ignore[attr-defined]  # as if copied while the parent held it
            events = [UsageEvent.model_validate(fields) for fields in batch("child", 10)]

            async def use_the_store() -> None:  # the provider: a facade is refused after a fork
                await provider.ingest_usage_events(events)
                await provider.aclose()

            asyncio.run(use_the_store())
            weakref.finalize._exitfunc()  # type: ignore[attr-defined]  # run at exit
            return "exited"

        assert said_in_a_child(in_the_child, limit=5) == "exited"
        await metering.ingest_usage_events(batch("parent", 10))
        assert await eventually_in_the_file(path, 20) == 20
    finally:
        await metering.close()


def test_a_failing_checkpoint_is_reported_once_per_outage_and_so_is_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk failing now and then: each outage is one warning, however many intervals
    it lasts or however it flaps, and its end is said once checkpoints have worked
    `RECOVERED_AFTER` times in a row; a second outage is not lost for having the same
    message as the first."""
    flapping = ["fail", "ok"] * RECOVERED_AFTER
    steady = ["ok"] * RECOVERED_AFTER
    script = ["fail", "fail", *flapping, *steady, "fail", *steady]
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
