"""The ledger and its mirrors: every event the sql store accepts, and every cancellation,
reaches each mirror exactly once (here the HTTP provider against a real service on
127.0.0.1), through outages, refusals, a forwarder killed between sending and marking,
and two forwarders over one PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from prometheus_client.parser import text_string_to_metric_families

from metering_core import (
    AsyncMetering,
    Capabilities,
    CellStatus,
    ConfigurationError,
    IngestResult,
    LinkOutcome,
    Meter,
    MeterCreate,
    Metering,
    MeteringSettings,
    NotFoundError,
    ProviderUnavailableError,
    ReconcileCell,
    ReconcileReport,
    UsageEvent,
    UsageQuery,
    ValidationError,
)
from metering_core.collector import YOUNG
from metering_core.epoch import epoch_micros
from metering_core.interface import IMetering, Ledger
from metering_core.memory import MemoryProvider
from metering_core.models import Aggregation, RefusalNotice
from metering_core.server import create_app
from metering_core.sql import SqlSettings, mirrors, store_clock
from metering_core.sql import ingest as sql_ingest
from metering_core.sql import provider as sql_provider
from metering_core.sql import reconcile as reconcile_module
from metering_core.sql.provider import SqlProvider
from metering_core.sql.schema import (
    events,
    mirror_deliveries,
    mirror_meters,
    mirror_repairs,
    outbox,
)
from metering_core.sql.schema import mirrors as schema_mirrors
from metering_core.sql.store import _config as alembic_config
from metering_core.testing.serving import serve_in_thread
from tests.forks import said_in_a_child

pytest.importorskip("metering_http")

AT = datetime(2026, 11, 2, 10, tzinfo=UTC)
KEYS = {
    "admin": {
        "scopes": [
            "meters:read",
            "meters:write",
            "usage:read",
            "usage:write",
            "customers:write",
            "metrics:read",
        ]
    },
}
KEYS["replicator"] = {"scopes": [*KEYS["admin"]["scopes"], "usage:replicate"]}


@pytest.fixture(params=["sqlite_url", "postgres_url"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(request.param)
    return url


@pytest.fixture
def mirror_service() -> Iterator[tuple[str, AsyncMetering]]:
    """The billing side: a metering service over memory, on loopback."""
    behind = AsyncMetering("memory")
    with serve_in_thread(create_app(behind, keys=KEYS)) as url:
        yield url, behind


def billing(url: str) -> dict[str, Any]:
    return {"billing": {"provider": "http", "base_url": url, "api_key": "admin"}}


@pytest.fixture
async def ledger(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> AsyncIterator[AsyncMetering]:
    """A ledger whose forwarding each test drives (`flush_mirrors`, the forwarder's
    passes): the forwarder a Metering runs alongside its delivery has tests of its own."""
    metering = AsyncMetering(
        "sql",
        url=ledger_url,
        mirrors=billing(mirror_service[0]),
        linger=0,
        mirror_forwarder=False,
    )
    await metering.create_meter(event_name="calls")
    yield metering
    await metering.close()


def event(n: int, customer: str = "acme", name: str = "calls") -> UsageEvent:
    return UsageEvent(
        id=f"e{n}",
        event_name=name,
        customer_id=customer,
        value=Decimal(n % 5 + 1),
        timestamp=AT + timedelta(seconds=n),
    )


async def totals(metering: AsyncMetering) -> dict[str, Decimal]:
    """Each customer's total of the `calls` meter."""
    meter = next(m for m in (await metering.fetch_all_meters()).items if m.event_name == "calls")
    usage = await metering.fetch_usage(
        meter.id, start=AT, end=AT + timedelta(days=1), group_by=["customer_id"]
    )
    return {row.customer_id or "": row.value for row in usage.rows}


def mirror_outcomes(url: str) -> dict[str, float]:
    """What the mirror's service counted, by outcome (accepted, duplicate, rejected), of
    the outcomes it met (the page shows each outcome from the start, at 0)."""
    import httpx

    page = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer admin"}).text
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "metering_events_ingested_total" and sample.value
    }


async def test_every_stored_event_and_cancellation_reaches_the_mirror_once(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    url, behind = mirror_service
    await behind.create_meter(event_name="calls")
    sent = [event(n, customer=f"t{n % 3}") for n in range(300)]
    await ledger.ingest_usage_events([*sent[:200], *sent[100:]])  # 100 sent twice
    await ledger.cancel_usage_events(["e7", "e8"])

    statuses = await ledger.flush_mirrors(timeout=30)

    assert [(s.mirror, s.depth, s.dead_letters) for s in statuses] == [("billing", 0, 0)]
    assert await totals(behind) == await totals(ledger)
    # each once, nothing sent twice; the two cancelled before forwarding are never sent
    assert mirror_outcomes(url) == {"accepted": 298}
    [status] = statuses
    # the meter, the events sent, the cancels; the two cancelled before they were sent
    assert (status.delivered, status.withheld, status.refused) == (1 + 298 + 2, 2, 0)


async def owed(metering: AsyncMetering, *, until: int, seconds: float = 30) -> int:
    """The outbox's depth once it is `until`, or after `seconds` if it never gets there."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        [status] = await metering.mirror_status()
        if status.depth == until or asyncio.get_running_loop().time() > deadline:
            return status.depth
        await asyncio.sleep(0.05)


async def test_a_metering_forwards_alongside_its_delivery_until_it_closes(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A long-lived Metering over a ledger with mirrors forwards by itself: its meter and
    what it ingests reach the mirror with nobody flushing. Closing stops the forwarder
    before the store, and leaves no task of it behind."""
    url, behind = mirror_service
    before = asyncio.all_tasks()
    metering = AsyncMetering("sql", url=ledger_url, mirrors=billing(url), linger=0)
    try:
        await metering.create_meter(event_name="calls")
        sent = [event(n, customer=f"t{n % 3}") for n in range(120)]
        await metering.ingest_usage_events(sent)
        assert await owed(metering, until=0) == 0
        assert await totals(behind) == await totals(metering) != {}
    finally:
        await metering.close()
    left = [task for task in asyncio.all_tasks() - before if not cancels_a_query(task)]
    assert not left, left


async def test_a_metering_told_not_to_forward_leaves_the_outbox_to_another_forwarder(
    sqlite_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """`mirror_forwarder=False` (a Lambda, a one-off command, a fleet whose forwarding
    runs as `metering mirror run`): what it ingests stays owed, for the forwarder that
    runs elsewhere."""
    url, behind = mirror_service
    async with AsyncMetering(
        "sql", url=sqlite_url, mirrors=billing(url), linger=0, mirror_forwarder=False
    ) as metering:
        await metering.create_meter(event_name="calls")
        await metering.ingest_usage_events([event(n) for n in range(5)])
        await metering.flush()
        assert await owed(metering, until=0, seconds=1.5) == 6  # the meter and five events
        assert not (await behind.fetch_all_meters()).items
        [status] = await metering.flush_mirrors(timeout=30)  # another forwarder's work
        assert status.depth == 0


def test_the_sync_metering_forwards_from_its_own_loop(
    sqlite_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """The sync facade starts its delivery when built, and the forwarder with it."""
    url, behind = mirror_service
    with Metering("sql", url=sqlite_url, mirrors=billing(url), linger=0) as metering:
        metering.create_meter(event_name="calls")
        metering.ingest_usage_events([event(n, customer=f"t{n % 2}") for n in range(40)])
        for _ in range(600):
            [status] = metering.mirror_status()
            if status.depth == 0:
                break
            time.sleep(0.05)
        assert status.depth == 0
        meter = next(m for m in metering.fetch_all_meters().items if m.event_name == "calls")
        usage = metering.fetch_usage(
            meter.id, start=AT, end=AT + timedelta(days=1), group_by=["customer_id"]
        )
    assert asyncio.run(totals(behind)) == {row.customer_id or "": row.value for row in usage.rows}


async def test_a_metering_closed_before_it_started_forwards_nothing(tmp_path: Path) -> None:
    """Closing a Metering that never ran starts nothing: with a spool, close flushes (and
    so starts delivery), but no forwarder pass may begin then, to be cut short at once,
    and the store is not even opened."""
    store = tmp_path / "ledger.db"
    metering = AsyncMetering(
        "sql",
        url=f"sqlite:///{store}",
        mirrors={"billing": {"provider": "memory"}},  # answers at once: a pass begins
        spool_path=tmp_path / "spool.db",
    )
    await metering.close()
    assert not store.exists()


def test_a_sync_metering_made_before_a_fork_works_in_the_child_and_the_parent(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A Metering made at import (gunicorn --preload, multiprocessing) and used, then
    forked: the child reads through connections of its own, not the parent's sockets or
    aiosqlite's threads (it hung on SQLite, and on PostgreSQL wrote into the parent's
    connection, failing the parent's forwarder). The child collects and closes as a
    worker does, ending none of the parent's connections (its next statements hung until
    their timeout), and the parent goes on."""
    import gc

    url, behind = mirror_service
    with Metering("sql", url=ledger_url, mirrors=billing(url), linger=0) as metering:
        metering.create_meter(event_name="calls")
        metering.ingest_usage_events([event(n) for n in range(20)])
        metering.flush()
        # settled, as at a preload's fork: a thread inside SQLite as the process forks
        # leaves SQLite's own locks held in the child, where no thread releases them (its
        # first call hangs: about one fork in 50 did, forked mid-pass)
        metering.flush_mirrors(timeout=10)

        def as_a_worker() -> str:
            meters = metering.fetch_all_meters().items
            gc.collect()  # what the parent left to the child, collected
            metering.close()
            return f"meters {len(meters)}"

        assert said_in_a_child(as_a_worker) == "meters 1"
        metering.ingest_usage_events([event(n) for n in range(20, 40)])
        [status] = metering.flush_mirrors(timeout=10)  # a connection ended: 15 s, and more
        assert status.depth == 0
    assert asyncio.run(totals(behind))["acme"] == sum(Decimal(n % 5 + 1) for n in range(40))


async def test_a_batch_owes_every_mirror_each_event_it_stored(sqlite_url: str) -> None:
    """Two mirrors and 700 events: 1,400 outbox rows, written several hundred a statement."""
    provider = SqlProvider(
        SqlSettings(
            url=sqlite_url, mirrors={"a": {"provider": "memory"}, "b": {"provider": "memory"}}
        )
    )
    meter = await provider.create_meter(MeterCreate(event_name="calls"))
    sent = [event(n, customer=f"t{n % 4}") for n in range(700)]
    await provider.ingest_usage_events([*sent, sent[3]])  # one of them twice

    owed = {s.mirror: s.depth for s in await provider.forwarder.status()}
    assert owed == {"a": 701, "b": 701}  # each event, and the meter
    await provider.flush_mirrors(timeout=30)

    query = UsageQuery(meter_id=meter.id, start=AT, end=AT + timedelta(days=1))
    expected = sum(e.value for e in sent)
    for name in ("a", "b"):
        mirror = provider.forwarder.mirrors[name]
        [mirrored] = (await mirror.fetch_all_meters()).items
        usage = await mirror.fetch_usage(query.model_copy(update={"meter_id": mirrored.id}))
        assert [row.value for row in usage.rows] == [expected], name
    await provider.aclose()


class Wrapped:
    """A mirror with a smaller batch, a delay per delivery, or down (it cannot even say
    its capabilities) while `down` is set."""

    def __init__(self, inner: Any, *, batch: int | None = None, delay: float = 0.0) -> None:
        self.inner, self.batch, self.delay, self.down = inner, batch, delay, False
        self.sending = self.most_at_once = 0

    async def load_capabilities(self) -> Any:
        if self.down:
            raise ProviderUnavailableError("down")
        found = await self.inner.load_capabilities()
        return found.model_copy(update={"max_batch_size": self.batch or found.max_batch_size})

    async def ingest_usage_events(self, sent: Sequence[UsageEvent]) -> IngestResult:
        self.sending += 1
        self.most_at_once = max(self.most_at_once, self.sending)
        try:
            await asyncio.sleep(self.delay)
            result: IngestResult = await self.inner.ingest_usage_events(sent)
        finally:
            self.sending -= 1
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_every_pass_forwards_once_the_change_they_waited_behind_is_through(
    sqlite_url: str,
) -> None:
    """The meter's creation goes first, by one pass; the others, finding nothing they may
    take meanwhile, wait for it rather than stop: then all of them send at once."""
    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors={"billing": {"provider": "memory"}}))
    billing = Wrapped(provider.forwarder.mirrors["billing"], batch=10, delay=0.02)
    provider.forwarder.mirrors["billing"] = billing
    await provider.create_meter(MeterCreate(event_name="calls"))
    await provider.ingest_usage_events([event(n) for n in range(200)])

    assert await provider.forwarder.forward_all() == 201  # one call: all, the meter first

    [status] = await provider.forwarder.status()
    assert status.depth == 0
    assert billing.most_at_once == mirrors.PASSES
    await provider.aclose()


async def test_a_mirror_back_from_an_outage_is_served_while_another_is_busy(
    sqlite_url: str,
) -> None:
    """A running forwarder asks a mirror that was down again within its idle time, not
    once another mirror's backlog is gone (with usage arriving, that could be never)."""
    two = {"busy": {"provider": "memory"}, "flaky": {"provider": "memory"}}
    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors=two))
    await provider.create_meter(MeterCreate(event_name="calls"))
    await provider.flush_mirrors(timeout=30)  # the meter reaches both
    mirrors = provider.forwarder.mirrors
    busy = Wrapped(mirrors["busy"], batch=10, delay=0.05)  # 1,000 events: over a second
    flaky = Wrapped(mirrors["flaky"])
    flaky.down = True
    mirrors.update(busy=busy, flaky=flaky)
    await provider.ingest_usage_events([event(n) for n in range(1000)])
    running = asyncio.create_task(provider.forwarder.run(idle=0.05))
    try:
        await asyncio.sleep(0.2)
        flaky.down = False
        while True:
            depths = {s.mirror: s.depth for s in await provider.forwarder.status()}
            if depths["flaky"] == 0:
                break
            await asyncio.sleep(0.02)
        assert depths["busy"] > 0, depths  # still busy when the other had caught up
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await provider.aclose()


def cancels_a_query(task: asyncio.Task[Any]) -> bool:
    """asyncpg's own task asking the server to cancel a statement whose caller was
    cancelled: it ends by itself, and is asyncpg's to wait for."""
    return getattr(task.get_coro(), "__qualname__", "") == "Connection._cancel"


async def test_a_forwarder_cancelled_at_any_moment_has_ended_every_pass_when_it_returns(
    ledger_url: str,
) -> None:
    """`run` cancelled mid-send, mid-statement or at rest returns only once all its passes
    have ended, their cleanup (a rollback, a connection being closed) included: a pass
    left finishing after the caller closed the store could wait forever, and the test
    loop's teardown with it."""
    provider = SqlProvider(SqlSettings(url=ledger_url, mirrors={"busy": {"provider": "memory"}}))
    try:
        await provider.create_meter(MeterCreate(event_name="calls"))
        await provider.flush_mirrors(timeout=30)
        mirrors = provider.forwarder.mirrors
        mirrors["busy"] = Wrapped(mirrors["busy"], batch=7, delay=0.002)
        await provider.ingest_usage_events([event(n) for n in range(3000)])
        before = asyncio.all_tasks()
        for moment in range(25):
            running = asyncio.create_task(provider.forwarder.run(idle=0.01))
            await asyncio.sleep(0.003 * (moment % 9))
            running.cancel()
            await asyncio.wait({running}, timeout=10)  # not ended: a pass kept it running
            assert running.cancelled(), f"cancelled at {moment}: {running}"
            left = [task for task in asyncio.all_tasks() - before if not cancels_a_query(task)]
            assert not left, f"cancelled at {moment}: {left}"
    finally:
        await provider.aclose()


class Stubborn(Wrapped):
    """A mirror that, cancelled while it sends (or, `when="asked"`, while it says its
    batch size), raises an error of its own instead."""

    def __init__(self, inner: Any, *, when: str) -> None:
        super().__init__(inner, batch=10, delay=0.5)
        self.when = when
        self.reached = asyncio.Event()
        self.stubborn = True

    async def load_capabilities(self) -> Any:
        if self.when != "asked":
            return await super().load_capabilities()
        self.reached.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.stubborn:
                raise ProviderUnavailableError("interrupted") from None
            raise

    async def ingest_usage_events(self, sent: Sequence[UsageEvent]) -> IngestResult:
        self.reached.set()
        try:
            return await super().ingest_usage_events(sent)
        except asyncio.CancelledError:
            if self.stubborn:
                raise ProviderUnavailableError("interrupted") from None
            raise


@pytest.mark.parametrize("when", ["sending", "asked"])
async def test_a_mirror_that_turns_its_cancellation_into_an_error_stops_the_forwarder_anyway(
    sqlite_url: str, when: str
) -> None:
    """A pass whose cancellation a mirror made an error of would otherwise take it as a
    failure to wait out and go on, and the forwarder could never be stopped."""
    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors={"slow": {"provider": "memory"}}))
    await provider.create_meter(MeterCreate(event_name="calls"))
    await provider.flush_mirrors(timeout=30)
    mirrors = provider.forwarder.mirrors
    mirrors["slow"] = slow = Stubborn(mirrors["slow"], when=when)
    await provider.ingest_usage_events([event(n) for n in range(100)])
    running = asyncio.create_task(provider.forwarder.run(idle=0.01))
    try:
        await asyncio.wait_for(slow.reached.wait(), 10)
        await asyncio.sleep(0.05)  # every pass at it
        running.cancel()
        await asyncio.wait({running}, timeout=10)
        assert running.cancelled()
    finally:
        slow.stubborn = False
        while not running.done():  # failed: its passes, cancelled once, must be again
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
            await asyncio.wait({running}, timeout=1)
        await provider.aclose()


async def test_a_mirror_that_is_down_is_owed_everything_until_it_is_back(
    ledger_url: str,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = f"http://127.0.0.1:{port}"
    options: dict[str, Any] = {"max_attempts": 2, "retry_backoff": 0.01}
    async with AsyncMetering("sql", url=ledger_url, mirrors=billing(down), **options) as ledger:
        await ledger.create_meter(event_name="calls")
        await ledger.ingest_usage_events([event(n) for n in range(50)])
        with pytest.raises(TimeoutError):
            await ledger.flush_mirrors(timeout=1)
        [status] = await ledger.mirror_status()
        assert (status.depth, status.dead_letters) == (51, 0)  # the meter, 50 events: owed
        assert status.oldest_seconds is not None

        behind = AsyncMetering("memory")
        with serve_in_thread(create_app(behind, keys=KEYS), port=port):
            [status] = await ledger.flush_mirrors(timeout=30)  # the meter first, then usage
            assert (status.depth, status.dead_letters) == (0, 0)
            assert await totals(behind) == await totals(ledger)
            assert mirror_outcomes(down) == {"accepted": 50}


async def test_an_event_the_mirror_refuses_becomes_its_dead_letter_until_retried(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    _, behind = mirror_service
    seats = await ledger.create_meter(event_name="seats")
    await ledger.flush_mirrors(timeout=30)  # both meters are on the mirror now
    [theirs] = [m for m in (await behind.fetch_all_meters()).items if m.event_name == "seats"]
    await behind.delete_meter(theirs.id)  # deleted on the billing side behind our back
    await ledger.ingest_usage_events([event(1), event(2, name="seats"), event(3)])

    [status] = await ledger.flush_mirrors(timeout=30)

    assert (status.depth, status.dead_letters) == (0, 1)
    assert status.refused == 1
    assert await totals(behind) == await totals(ledger)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    async with provider._transaction(writes=False) as connection:
        kept = (await connection.execute(sa.select(outbox.c.event_id, outbox.c.refused))).all()
    assert len(kept) == 1  # delivered rows are gone: the outbox holds only the dead letter
    assert kept[0][0] == "e2"
    assert "seats" in kept[0][1]

    await behind.create_meter(event_name="seats")  # the cause fixed
    assert await ledger.retry_mirror_dead_letters("billing") == 1
    [status] = await ledger.flush_mirrors(timeout=30)
    assert (status.depth, status.dead_letters) == (0, 0)
    usage = await behind.fetch_usage(
        next(m.id for m in (await behind.fetch_all_meters()).items if m.event_name == "seats"),
        start=AT,
        end=AT + timedelta(days=1),
    )
    assert sum(row.value for row in usage.rows) == event(2).value
    assert seats.event_name == "seats"


async def test_rows_sent_by_a_forwarder_killed_before_marking_them_count_once(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, behind = mirror_service
    await behind.create_meter(event_name="calls")
    await ledger.ingest_usage_events([event(n) for n in range(40)])
    await ledger.flush()
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    assert await provider.forwarder.forward("billing") == 1  # the meter goes first
    monkeypatch.setattr(provider.forwarder, "lease", 0.2)
    real_settle = mirrors.Forwarder._settle

    async def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed between sending and marking")

    monkeypatch.setattr(mirrors.Forwarder, "_settle", killed)
    with pytest.raises(SystemExit):
        await provider.forwarder.forward("billing")
    monkeypatch.setattr(mirrors.Forwarder, "_settle", real_settle)
    assert mirror_outcomes(url) == {"accepted": 40}  # sent, but not marked
    assert await provider.forwarder.forward("billing") == 0  # still leased
    await asyncio.sleep(0.3)  # the lease runs out

    [status] = await ledger.flush_mirrors(timeout=30)

    assert (status.depth, status.dead_letters) == (0, 0)
    assert mirror_outcomes(url) == {"accepted": 40, "duplicate": 40}
    assert await totals(behind) == await totals(ledger)


async def test_two_forwarders_over_one_postgres_never_send_a_row_twice(
    postgres_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    url, behind = mirror_service
    await behind.create_meter(event_name="calls")
    first = SqlProvider(SqlSettings(url=postgres_url, mirrors=billing(url)))
    second = SqlProvider(SqlSettings(url=postgres_url, mirrors=billing(url)))
    try:
        async with AsyncMetering(first, linger=0) as ledger:
            await ledger.create_meter(event_name="calls")
            await ledger.ingest_usage_events([event(n, f"t{n % 7}") for n in range(3000)])
            await ledger.flush()

            async def drain(provider: SqlProvider) -> None:
                while await provider.forwarder.forward("billing", limit=100):
                    pass

            await asyncio.gather(drain(first), drain(second), drain(first), drain(second))
            [status] = await ledger.mirror_status()
            assert (status.depth, status.dead_letters) == (0, 0)
            assert mirror_outcomes(url) == {"accepted": 3000}
            assert await totals(behind) == await totals(ledger)
    finally:
        await second.aclose()


class LedgerOfBefore(MemoryProvider):
    """A ledger as a plugin could have written it before `deliver_with` existed: every
    member of `Ledger`, and no more."""

    mirrored = True
    forwarding = False

    async def mirror_status(self) -> list[Any]:
        return []

    async def flush_mirrors(self, timeout: float | None = None) -> list[Any]:
        return []

    async def forward_mirrors(self) -> None:
        self.forwarding = True
        await asyncio.Event().wait()

    async def reconcile(self, mirror: str, **query: Any) -> Any:
        raise NotImplementedError

    async def link_mirror(self, mirror: str) -> list[Any]:
        return []

    async def backfill_mirror(self, mirror: str, **span: Any) -> int:
        return 0

    async def retry_mirror_dead_letters(self, mirror: str) -> int:
        return 0

    async def receive_notice(self, source: str, body: bytes, headers: Any) -> int:
        return 0


async def test_a_ledger_without_deliver_with_is_still_one_and_runs_its_forwarder() -> None:
    """`deliver_with` is a protocol of its own (review): added to `Ledger`, it made every
    ledger written before it stop being one, silently (no forwarder, no mirror routes)."""
    ledger = LedgerOfBefore()
    assert isinstance(ledger, Ledger)
    async with AsyncMetering(ledger, linger=0) as metering:
        assert await metering.flush_mirrors() == []
        await metering.create_meter(event_name="calls")
        await metering.ingest_usage_events([event(1)])
        await metering.flush()
        assert ledger.forwarding  # started alongside the queue; closing stops it


async def test_a_second_facade_over_one_ledger_says_whose_settings_its_forwarder_keeps(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Both share the provider's forwarder: the newer's settings hold (review). And a
    delivery timeout longer than a pass may last is pointed out."""
    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors={"billing": {"provider": "memory"}}))
    try:
        AsyncMetering(provider, max_attempts=3)
        AsyncMetering(provider, max_attempts=3, linger=1.0)  # delivery alike: nothing said
        assert "second Metering" not in caplog.text
        AsyncMetering(provider, max_attempts=1)
        assert "second Metering over the same ledger" in caplog.text
        assert "max_attempts=1" in caplog.text
        assert "mirror lease" not in caplog.text
        AsyncMetering(provider, max_attempts=1, delivery_timeout=100)  # a pass lasts 96 s
        assert "delivery_timeout=100" in caplog.text
        assert "raise mirror_lease" in caplog.text
    finally:
        await provider.aclose()


def test_a_facade_without_mirrors_says_which_setting_gives_them() -> None:
    with pytest.raises(ConfigurationError, match="mirrors"):
        asyncio.run(AsyncMetering("memory").mirror_status())


async def test_a_sql_mirror_takes_its_own_options_not_the_ledgers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """METERING_SQL_* are the ledger's: read for a sql mirror too, its mirrors made it
    mirror itself without end (RecursionError), and a mirror without a url became the
    ledger's own store (probe)."""
    ledger_file, copy_file = tmp_path / "ledger.db", tmp_path / "copy.db"
    copy = {"copy": {"provider": "sql", "url": f"sqlite:///{copy_file}"}}
    monkeypatch.setenv("METERING_SQL_URL", f"sqlite:///{ledger_file}")
    monkeypatch.setenv("METERING_SQL_MIRRORS", json.dumps(copy))
    async with AsyncMetering("sql", linger=0, mirror_forwarder=False) as ledger:
        await ledger.create_meter(event_name="calls")
        await ledger.ingest_usage_events([event(1), event(2)])
        [status] = await ledger.flush_mirrors(timeout=30)
    assert (status.mirror, status.depth, status.dead_letters) == ("copy", 0, 0)
    monkeypatch.delenv("METERING_SQL_MIRRORS")
    async with AsyncMetering("sql", url=f"sqlite:///{copy_file}") as mirrored:
        [meter] = (await mirrored.fetch_all_meters()).items
        usage = await mirrored.fetch_usage(meter.id, start=AT, end=AT + timedelta(days=1))
    assert usage.total == event(1).value + event(2).value

    monkeypatch.chdir(tmp_path)
    (tmp_path / "linked.db").hardlink_to(ledger_file)
    nested = {"back": {"provider": "sql", "url": f"sqlite:///{ledger_file}"}}
    for options, said in (
        ({"provider": "sql"}, "mirrors.copy: a sql mirror names its store's url"),
        ({"provider": "sql", "url": "sqlite:///ledger.db"}, "is the ledger's own store"),
        ({"provider": "sql", "url": "sqlite:///linked.db"}, "is the ledger's own store"),
        (copy["copy"] | {"mirrors": nested}, "a sql mirror has no mirrors of its own"),
    ):
        with pytest.raises(ConfigurationError, match=said):
            AsyncMetering("sql", mirrors={"copy": options})


@pytest.mark.parametrize(
    ("ledger_url", "mirror_url"),
    [
        ("postgresql://u@localhost/db", "postgresql+asyncpg://x@127.0.0.1:5432/db"),
        ("postgresql://u@/db?host=/var/run/postgresql", "postgresql://u@localhost/db"),
        ("postgresql://alice@db.example/", "postgresql://alice@db.example:5432/alice"),
        ("postgresql://u@127.0.0.1:55432/db", "postgresql://u@/db?host=/tmp/pg&port=55432"),
        ("postgresql://u@LOCALHOST/db", "postgresql://u@127.0.0.2/db"),
        ("postgresql://u@localhost:55432/db", "postgresql://u@/db?host=localhost:55432"),
        ("postgresql://u@localhost:55432/db", "postgresql://u@localhost:6543/db?port=55432"),
        ("postgresql://u@localhost/db", "postgresql://u@db.example.com/db?host=localhost"),
        ("postgresql://u@localhost/db", "postgresql://u@[::ffff:127.0.0.1]/db?port=%C2%B2"),
    ],
)
def test_a_sql_mirror_naming_the_ledgers_database_another_way_is_refused(
    ledger_url: str, mirror_url: str
) -> None:
    """A loopback name, a socket, the default port and database (the user's name): the
    same database of the same server (review)."""
    mirrors = {"copy": {"provider": "sql", "url": mirror_url}}
    with pytest.raises(ConfigurationError, match="is the ledger's own store"):
        AsyncMetering("sql", url=ledger_url, mirrors=mirrors)
    another_database = re.sub(r"/(\w*)(\?|$)", r"/other\2", mirror_url, count=1)
    other = {"copy": {"provider": "sql", "url": another_database}}
    AsyncMetering("sql", url=ledger_url, mirrors=other)  # another database: a mirror
    elsewhere = {"copy": {"provider": "sql", "url": "postgresql://u@/db?host=/tmp/pg&port=6543"}}
    AsyncMetering("sql", url="postgresql://u@localhost/db", mirrors=elsewhere)  # another port


def test_a_mirrors_secret_never_shows_in_a_repr_or_a_refusal(sqlite_url: str) -> None:
    secret = "sk_test_do_not_print_me"
    settings = SqlSettings(
        url=sqlite_url, mirrors={"billing": {"provider": "stripe", "api_key": secret}}
    )
    assert secret not in repr(settings)
    assert "'billing': 'stripe'" in repr(settings)
    with pytest.raises(ConfigurationError) as refused:  # mirrors given as a list
        AsyncMetering("sql", url=sqlite_url, mirrors=[{"provider": "stripe", "api_key": secret}])
    assert secret not in str(refused.value)
    for options in (
        {"provider": "stripe", "api_kye": secret},  # a secret under a misspelt name
        {"provider": "stripe", "api_key": 123456789},
    ):
        with pytest.raises(ConfigurationError) as refused:
            SqlProvider(SqlSettings(url=sqlite_url, mirrors={"billing": options}))
        assert secret not in str(refused.value)
        assert "123456789" not in str(refused.value)
        assert "api_k" in str(refused.value)  # the option is named


async def test_reconcile_proves_agreement_and_names_every_cell_that_differs(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    _, behind = mirror_service
    await behind.create_meter(event_name="calls")
    day = timedelta(days=1)
    spread = [
        event(n, customer=f"t{n % 3}").model_copy(update={"timestamp": AT + day * (n % 4)})
        for n in range(60)
    ]
    await ledger.ingest_usage_events(spread)
    await ledger.flush_mirrors(timeout=30)
    span = {"start": AT, "end": AT + 4 * day}

    agreed = await ledger.reconcile("billing", **span)

    assert agreed.ok
    assert len(agreed.cells) == 12  # 3 customers x 4 days, each with usage
    assert {c.status for c in agreed.cells} == {CellStatus.equal}
    assert sum(c.ledger or 0 for c in agreed.cells) == sum(e.value for e in spread)

    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    billing_side = provider.forwarder.mirrors["billing"]  # the mirror, changed behind our back
    await billing_side.cancel_usage_events(["e0"])  # it lost one: t0's first day is short
    await billing_side.ingest_usage_events([event(999, customer="t1")])  # and gained one
    owed = event(1000, customer="t2").model_copy(update={"timestamp": AT + 2 * day})
    await ledger.ingest_usage_events([owed])  # not forwarded yet: pending, not drift

    drifted = await ledger.reconcile("billing", **span)

    assert not drifted.ok
    differing = {
        (c.customer_id, c.start, c.status, c.ledger, c.mirror)
        for c in drifted.cells
        if c.status is not CellStatus.equal
    }
    t0 = sum(e.value for e in spread if e.customer_id == "t0" and e.timestamp == AT)
    t1 = sum(e.value for e in spread if e.customer_id == "t1" and e.timestamp == AT)
    t2 = sum(e.value for e in spread if e.customer_id == "t2" and e.timestamp == AT + 2 * day)
    third_day = (AT + 2 * day).replace(hour=0)  # the first window starts at `start`
    assert differing == {
        ("t0", AT, CellStatus.short, t0, t0 - event(0).value),
        ("t1", AT, CellStatus.over, t1, t1 + event(999).value),
        ("t2", third_day, CellStatus.pending, t2 + owed.value, t2),
    }


async def test_usage_of_a_meter_the_mirror_lacks_is_short_and_linking_lets_repair_fill_it(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A mirror with no meter of the event name bills nothing of it: drift, not "not
    comparable" in a report that is ok (probe: the mirror's meter deleted there, and
    `metering reconcile` exited 0). Repair has nothing to send it into; linking makes
    the meter, and the next repair brings the mirror to the ledger's total."""
    await ledger.ingest_usage_events([event(1), event(2)])
    day = {"start": AT, "end": AT + timedelta(days=1)}
    report = await ledger.reconcile("billing", **day)
    assert [c.status for c in report.cells] == [CellStatus.pending]  # its meter on its way
    await ledger.flush_mirrors(timeout=30)
    _, behind = mirror_service
    [theirs] = (await behind.fetch_all_meters()).items
    await behind.delete_meter(theirs.id)  # behind the ledger's back: none owed

    report = await ledger.reconcile("billing", **day, repair=True)

    assert not report.ok
    [cell] = report.cells
    total = event(1).value + event(2).value
    assert (cell.status, cell.ledger, cell.mirror, cell.repaired) == (
        CellStatus.short,
        total,
        None,
        False,
    )
    assert (await behind.fetch_all_meters()).items == []  # nothing made or sent there
    assert "1 short cell(s) of 'calls' left unrepaired" in caplog.text  # not sent
    await ledger.link_mirror("billing")
    repaired = await ledger.reconcile("billing", **day, repair=True)
    assert [c.repaired for c in repaired.cells] == [True]
    [made] = (await behind.fetch_all_meters()).items
    assert (await behind.fetch_usage(made.id, **day)).total == total
    with pytest.raises(ValidationError, match="mirror='ledger'"):
        await ledger.reconcile("ledger", **day)


async def test_cells_of_a_meter_the_mirror_lacks_are_pending_then_refused_and_zero_is_equal(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Its events still owed, a cell is pending; refused there (no meter to count them),
    refused; a customer whose events sum to nothing has nothing unbilled: equal."""
    await ledger.flush_mirrors(timeout=30)
    _, behind = mirror_service
    [theirs] = (await behind.fetch_all_meters()).items
    await behind.delete_meter(theirs.id)
    nothing = event(5, customer="zero").model_copy(update={"value": Decimal(0)})
    await ledger.ingest_usage_events([event(1), nothing])
    day = {"start": AT, "end": AT + timedelta(days=1)}

    def statuses(report: ReconcileReport) -> dict[str, CellStatus]:
        return {cell.customer_id: cell.status for cell in report.cells}

    owed = await ledger.reconcile("billing", **day)
    assert statuses(owed) == {"acme": CellStatus.pending, "zero": CellStatus.equal}
    assert owed.ok
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.dead_letters == 2  # no meter there to take them
    refused = await ledger.reconcile("billing", **day)
    assert statuses(refused) == {"acme": CellStatus.refused, "zero": CellStatus.equal}
    assert not refused.ok


async def test_a_meter_the_forwarder_makes_while_reconcile_runs_is_compared(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Made on the mirror, linked and its events delivered after reconcile read the links
    and the mirror's meters, and before it looked at what is owed: read again, not
    called billed nowhere (review: short, and exit 1)."""
    await ledger.ingest_usage_events([event(1)])  # the meter and the event owed
    unsent = reconcile_module._unsent
    forwarded: list[bool] = []

    async def forwarded_first(*args: Any) -> Any:
        if not forwarded:
            forwarded.append(True)
            await ledger.flush_mirrors(timeout=30)
        return await unsent(*args)

    monkeypatch.setattr(reconcile_module, "_unsent", forwarded_first)
    report = await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))
    assert forwarded
    assert [(c.status, c.mirror) for c in report.cells] == [(CellStatus.equal, event(1).value)]


async def test_the_mirrors_meters_are_listed_once_however_many_it_lacks(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a listing of the mirror's meters (Stripe: pages of requests) per meter it
    lacks (review)."""
    for name in ("a", "b", "c"):
        await ledger.create_meter(event_name=name)
        await ledger.ingest_usage_events([event(1, name=name)])
    await ledger.flush_mirrors(timeout=30)
    _, behind = mirror_service
    for made in (await behind.fetch_all_meters()).items:
        await behind.delete_meter(made.id)
    mirror = ledger.provider.forwarder.mirrors["billing"]  # type: ignore[attr-defined]
    listed = reconcile_module._meters
    asked: list[IMetering] = []

    async def counted(provider: IMetering) -> list[Meter]:
        asked.append(provider)
        return await listed(provider)

    monkeypatch.setattr(reconcile_module, "_meters", counted)
    report = await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))
    assert {c.status for c in report.cells} == {CellStatus.short}
    assert sum(provider is mirror for provider in asked) == 1  # no link changed meanwhile


async def test_a_meter_of_an_aggregation_the_mirror_cannot_hold_stays_not_comparable(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not `short` for good: no link could make it there (review: Stripe and a max meter
    that predates the mirror)."""
    await ledger.create_meter(event_name="peak", aggregation="max")
    await ledger.ingest_usage_events([event(1, name="peak")])
    await ledger.flush_mirrors(timeout=30)
    _, behind = mirror_service
    for made in (await behind.fetch_all_meters()).items:
        if made.event_name == "peak":
            await behind.delete_meter(made.id)
    sums_only = frozenset({Aggregation.SUM, Aggregation.COUNT})
    await mirror_stating(ledger, monkeypatch, aggregations=sums_only)

    report = await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))

    assert {(c.event_name, c.status) for c in report.cells} == {("peak", CellStatus.not_comparable)}
    assert report.ok


async def test_a_mirror_failing_on_a_change_says_so_once_until_it_takes_changes_again(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a line a pass (probe: 152 in ten seconds of `mirror run --once` against a
    mirror refusing the credentials)."""
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    making = mirror.create_meter

    async def failing(meter: MeterCreate) -> Meter:
        raise ProviderUnavailableError("down for maintenance", provider="http")

    mirror.create_meter = failing  # type: ignore[method-assign]
    for _ in range(3):
        assert await provider.forwarder.forward_all() == 0
    said = [r.getMessage() for r in caplog.records if "failed on meter" in r.getMessage()]
    assert len(said) == 1
    assert "down for maintenance" in said[0]
    assert "takes changes again" not in caplog.text

    stating = mirror.load_capabilities

    async def unreachable() -> Capabilities:
        raise ProviderUnavailableError("no route", provider="http")

    mirror.load_capabilities = unreachable  # type: ignore[method-assign]
    await provider.forwarder.forward_all()
    mirror.load_capabilities = stating  # type: ignore[method-assign]
    await provider.forwarder.forward_all()  # reachable again, still failing on the meter
    said = [r.getMessage() for r in caplog.records if "failed on meter" in r.getMessage()]
    assert len(said) == 2  # said again after "reachable again" (review)

    mirror.create_meter = making  # type: ignore[method-assign]
    await ledger.flush_mirrors(timeout=30)
    assert "mirror 'billing' takes changes again" in caplog.text
    assert len((await mirror_service[1].fetch_all_meters()).items) == 1


async def test_a_range_the_mirror_refuses_to_answer_is_an_error_not_an_ok_report(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Stripe refuses a start off the hour, any mirror a range of too many rows: cells
    not comparable in a report that is ok hid the drift behind them (probe)."""
    await ledger.ingest_usage_events([event(1)])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]

    async def refusing(query: UsageQuery) -> Any:
        raise ValidationError("start: not on an hour", field="start", value=query.start)

    mirror.fetch_usage = refusing  # type: ignore[method-assign]
    with pytest.raises(ValidationError, match="mirror 'billing' cannot answer") as refused:
        await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))
    assert (refused.value.field, refused.value.value) == ("start", AT)


async def test_a_mirror_meter_of_another_aggregation_is_not_comparable(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A sum here against a count there agrees only by coincidence: no proof either way.
    The mirror refused the meter, and its events with it: those cells are refused, not
    merely not comparable in a report that was ok (probe: nothing of them was billed)."""
    _, behind = mirror_service
    await behind.create_meter(event_name="calls", aggregation="count")
    await ledger.ingest_usage_events([event(1), event(2, customer="beta")])
    await ledger.flush_mirrors(timeout=30)
    report = await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))
    assert {c.status for c in report.cells} == {CellStatus.refused}
    assert not report.ok
    async with ledger.provider._transaction() as connection:  # type: ignore[attr-defined]
        await connection.execute(sa.delete(outbox))  # no dead letters: no refusal known
    report = await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))
    assert {c.status for c in report.cells} == {CellStatus.not_comparable}
    assert report.ok


async def test_a_pass_that_outlasts_its_lease_releases_its_rows_unmarked(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mirror that hangs cannot hold rows past the lease, when another forwarder could
    take them while they are still being sent: the pass stops, nothing is marked, and the
    rows are taken again (and delivered once) when the mirror answers."""
    _, behind = mirror_service
    await behind.create_meter(event_name="calls")
    await ledger.ingest_usage_events([event(n) for n in range(10)])
    await ledger.flush()
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    answering = mirror.ingest_usage_events

    async def hanging(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    assert await provider.forwarder.forward("billing") == 1  # the meter goes first
    monkeypatch.setattr(provider.forwarder, "lease", 0.3)
    monkeypatch.setattr(mirror, "ingest_usage_events", hanging)
    assert await asyncio.wait_for(provider.forwarder.forward("billing"), 5) == 0  # none settled
    [status] = await ledger.mirror_status()
    assert (status.depth, status.dead_letters) == (10, 0)

    monkeypatch.setattr(mirror, "ingest_usage_events", answering)
    [status] = await ledger.flush_mirrors(timeout=30)
    assert (status.depth, status.dead_letters) == (0, 0)
    assert await totals(behind) == await totals(ledger)


class Recording(Wrapped):
    """A mirror that notes the ids of each delivery and the collector's state meanwhile;
    it fails each while `failing`, and refuses each while `refusing`."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.failing = self.refusing = False
        self.sent: list[list[str]] = []
        self.collector: list[tuple[int, int]] = []

    async def ingest_usage_events(self, sent: Sequence[UsageEvent]) -> IngestResult:
        self.collector.append((gc.get_threshold()[0], gc.get_freeze_count()))
        if self.failing:
            raise ProviderUnavailableError("down", provider="http")
        if self.refusing:
            raise ValidationError("refused", field="value")
        self.sent.append([e.id for e in sent])
        return await super().ingest_usage_events(sent)


def ids(first: int, end: int) -> list[str]:
    """Ids of the `recorded` ledger's events, in the order they were stored."""
    return [f"e{n}" for n in range(10 + first, 10 + end)]


async def recording_owed(
    ledger: AsyncMetering, numbers: range, monkeypatch: pytest.MonkeyPatch
) -> tuple[mirrors.Forwarder, Recording]:
    """The ledger's forwarder, owing its mirror (made a `Recording`) `event(n)` for each
    of `numbers`: the meter already through."""
    await ledger.create_meter(event_name="calls")
    await ledger.ingest_usage_events([event(n) for n in numbers])
    await ledger.flush()
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    forwarder = provider.forwarder
    recording = Recording(forwarder.mirrors["billing"])
    monkeypatch.setitem(forwarder.mirrors, "billing", recording)
    assert await forwarder.forward("billing") == 1  # the meter
    return forwarder, recording


@pytest.fixture
async def recorded(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[AsyncMetering, mirrors.Forwarder, Recording]]:
    """A ledger owing 30 events to a recording mirror (the meter already through), its
    forwarder driven by the test, one attempt a delivery (the facade's setting)."""
    url, behind = mirror_service
    await behind.create_meter(event_name="calls")
    options: dict[str, Any] = {"max_attempts": 1, "linger": 0, "mirror_forwarder": False}
    async with AsyncMetering("sql", url=ledger_url, mirrors=billing(url), **options) as ledger:
        # ids as stored: e10-e39 sort as their numbers do
        forwarder, recording = await recording_owed(ledger, range(10, 40), monkeypatch)
        yield ledger, forwarder, recording


async def test_rows_a_failed_pass_gave_back_go_before_newer_ones(
    recorded: tuple[AsyncMetering, mirrors.Forwarder, Recording],
) -> None:
    """Each claim starts past the rows the one before it took, but rows a pass gave back
    lie behind that point: the next claim looks there first."""
    ledger, forwarder, recording = recorded
    assert await forwarder.forward("billing", limit=10) == 10
    recording.failing = True
    assert await forwarder.forward("billing", limit=10) == 0  # e10-e19, given back
    assert len(recording.collector) == 2  # one attempt each: the facade's max_attempts
    recording.failing = False
    assert await forwarder.forward("billing", limit=10) == 10
    assert recording.sent == [ids(0, 10), ids(10, 20)]
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.depth == 0
    assert recording.sent[2:] == [ids(20, 30)]


async def test_dead_letters_owed_again_go_before_newer_rows(
    recorded: tuple[AsyncMetering, mirrors.Forwarder, Recording],
) -> None:
    """They keep their place in order (found in review: they were owed again behind the
    cursor, and waited for the backlog's end or a sweep)."""
    ledger, forwarder, recording = recorded
    recording.refusing = True
    assert await forwarder.forward("billing", limit=10) == 10  # e10-e19: dead letters
    recording.refusing = False
    assert await forwarder.forward("billing", limit=10) == 10
    assert await ledger.retry_mirror_dead_letters("billing") == 10
    assert await forwarder.forward("billing", limit=10) == 10
    assert recording.sent == [ids(10, 20), ids(0, 10)]


async def test_a_pass_runs_with_young_collections_eased_and_nothing_frozen(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass makes a model of each event it sends (bench_mirrors: a collection every
    700 of them cost an in-process forwarder a seventh of its rate); freezing at each
    pass would hide garbage cycles from every collection. (The mirror is in memory: a
    service in this process would ease the collector for its whole run.)"""
    mirror = {"billing": {"provider": "memory"}}
    async with AsyncMetering(
        "sql", url=sqlite_url, mirrors=mirror, linger=0, mirror_forwarder=False
    ) as ledger:
        forwarder, recording = await recording_owed(ledger, range(10), monkeypatch)
        found, frozen = gc.get_threshold(), gc.get_freeze_count()
        gc.set_threshold(700, 10, 10)
        try:
            assert await forwarder.forward("billing") == 10
            assert recording.collector == [(YOUNG, frozen)]
            assert (gc.get_threshold(), gc.get_freeze_count()) == ((700, 10, 10), frozen)
        finally:
            gc.set_threshold(*found)


async def test_a_dead_passs_rows_are_taken_again_behind_a_backlog_once_its_lease_ends(
    recorded: tuple[AsyncMetering, mirrors.Forwarder, Recording],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forwarder killed holding rows leaves them leased; a forwarder still draining a
    backlog past them takes them again within a quarter lease of the lease's end, not
    only once the backlog is through."""
    ledger, forwarder, recording = recorded
    monkeypatch.setattr(forwarder, "lease", 1.0)
    real_settle = mirrors.Forwarder._settle

    async def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed between sending and marking")

    monkeypatch.setattr(mirrors.Forwarder, "_settle", killed)
    with pytest.raises(SystemExit):
        await forwarder.forward("billing", limit=10)  # e0-e9, sent, still leased
    monkeypatch.setattr(mirrors.Forwarder, "_settle", real_settle)
    assert await forwarder.forward("billing", limit=10) == 10  # e10-e19
    await asyncio.sleep(2.1)  # the dead pass's lease runs out (a second, and its token's part)
    assert await forwarder.forward("billing", limit=10) == 10
    assert recording.sent == [ids(0, 10), ids(10, 20), ids(0, 10)]
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.depth == 0
    assert recording.sent[3:] == [ids(20, 30)]


class Held(Wrapped):
    """A mirror that holds each delivery until `released`, then fails it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.holding, self.released = asyncio.Event(), asyncio.Event()

    async def ingest_usage_events(self, sent: Sequence[UsageEvent]) -> IngestResult:
        self.holding.set()
        await self.released.wait()
        raise ProviderUnavailableError("down", provider="http")


async def test_rows_another_forwarder_gave_back_are_taken_by_one_whose_cursor_is_past_them(
    recorded: tuple[AsyncMetering, mirrors.Forwarder, Recording],
    ledger_url: str,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forwarder knows when its own passes give rows back, not another's: when nothing
    is owed past its cursor, it looks behind it at once rather than at the next sweep."""
    _, forwarder, recording = recorded
    other = SqlProvider(SqlSettings(url=ledger_url, mirrors=billing(mirror_service[0])))
    held = Held(other.forwarder.mirrors["billing"])
    monkeypatch.setitem(other.forwarder.mirrors, "billing", held)
    other.deliver_with(MeteringSettings(max_attempts=1))
    try:
        holding = asyncio.create_task(other.forwarder.forward("billing", limit=10))
        await asyncio.wait_for(held.holding.wait(), 10)  # the other holds e10-e19
        assert await forwarder.forward("billing", limit=10) == 10
        assert await forwarder.forward("billing", limit=10) == 10  # the cursor past all
        held.released.set()
        assert await holding == 0  # given back
        assert await forwarder.forward("billing", limit=10) == 10
        assert recording.sent == [ids(10, 20), ids(20, 30), ids(0, 10)]
    finally:
        await other.aclose()


def test_the_service_shows_the_outbox_at_get_mirrors_and_in_its_metrics(sqlite_url: str) -> None:
    """The service over a ledger whose mirror is down: GET /mirrors and /metrics say
    what is owed (scope metrics:read), and a key without the scope is refused."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"
    keys = {**KEYS, "writer": {"scopes": ["usage:write", "meters:write"]}}
    ledger = AsyncMetering("sql", url=sqlite_url, mirrors=billing(down), max_attempts=1)
    with serve_in_thread(create_app(ledger, keys=keys)) as url:
        admin = {"Authorization": "Bearer admin"}
        httpx.post(f"{url}/meters", json={"event_name": "calls"}, headers=admin)
        sent = [{"event_name": "calls", "customer_id": "acme"} for _ in range(7)]
        answer = httpx.post(f"{url}/usage", json={"events": sent}, headers=admin)
        assert len(answer.json()["accepted"]) == 7

        shown = httpx.get(f"{url}/mirrors", headers=admin).json()
        assert [(s["mirror"], s["provider"], s["depth"], s["dead_letters"]) for s in shown] == [
            ("billing", "http", 8, 0)  # the meter and 7 events
        ]
        page = httpx.get(f"{url}/metrics", headers=admin).text
        gauges = {
            (sample.name, sample.labels["mirror"]): sample.value
            for family in text_string_to_metric_families(page)
            for sample in family.samples
            if sample.name.startswith("metering_mirror_")
        }
        assert gauges[("metering_mirror_outbox_depth", "billing")] == 8
        assert gauges[("metering_mirror_dead_letters", "billing")] == 0
        assert gauges[("metering_mirror_oldest_seconds", "billing")] >= 0
        assert gauges[("metering_mirror_delivered_total", "billing")] == 0  # it is down
        assert gauges[("metering_mirror_refused_total", "billing")] == 0
        assert gauges[("metering_mirror_withheld_total", "billing")] == 0
        refused = httpx.get(f"{url}/mirrors", headers={"Authorization": "Bearer writer"})
        assert refused.status_code == 403


async def their_meters(behind: AsyncMetering) -> dict[str, Meter]:
    return {m.event_name: m for m in (await behind.fetch_all_meters()).items}


async def test_meters_and_customers_follow_the_ledger_to_the_mirror(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    _, behind = mirror_service
    seats = await ledger.create_meter(
        event_name="seats", display_name="Seats", aggregation="max", dimensions=["region"]
    )
    await ledger.create_customer(id="acme", name="Acme")
    await ledger.flush_mirrors(timeout=30)

    there = await their_meters(behind)
    assert sorted(there) == ["calls", "seats"]
    assert (there["seats"].display_name, there["seats"].aggregation) == ("Seats", "max")
    assert there["seats"].dimensions == ["region"]  # the mirror keeps dimensions
    assert (await behind.create_customer(id="acme", name="Acme")).name == "Acme"  # it has it

    await ledger.update_meter(seats.id, display_name="Seats in use")
    await ledger.flush_mirrors(timeout=30)
    assert (await their_meters(behind))["seats"].display_name == "Seats in use"

    await ledger.create_customer(id="brief")  # gone before the forwarder came to it
    await ledger.delete_customer("brief")
    await ledger.delete_meter(seats.id)  # created there by the ledger: deleted there too
    await ledger.delete_customer("acme")  # a billing customer is the billing team's to delete
    [status] = await ledger.flush_mirrors(timeout=30)
    assert (status.depth, status.dead_letters) == (0, 0)
    assert sorted(await their_meters(behind)) == ["calls"]
    await behind.delete_customer("acme")  # still there
    with pytest.raises(NotFoundError):
        await behind.delete_customer("brief")  # never created there
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    async with provider._transaction(writes=False) as connection:
        links = (await connection.execute(sa.select(mirror_meters))).all()
    calls = next(m for m in (await ledger.fetch_all_meters()).items if m.event_name == "calls")
    assert [(row.mirror, row.meter_id) for row in links] == [("billing", calls.id)]
    assert links[0].mirror_meter_id == (await their_meters(behind))["calls"].id


async def test_a_meter_the_mirror_has_under_another_aggregation_is_a_dead_letter(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    _, behind = mirror_service
    await behind.create_meter(event_name="calls", aggregation="count")
    [status] = await ledger.flush_mirrors(timeout=30)
    assert (status.depth, status.dead_letters) == (0, 1)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    async with provider._transaction(writes=False) as connection:
        [(kind, reason)] = await connection.execute(sa.select(outbox.c.kind, outbox.c.refused))
    assert kind == "meter"
    assert "aggregating 'count'" in reason
    assert "not 'sum'" in reason


async def test_link_and_backfill_bring_a_mirror_added_later_up_to_the_ledger(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    url, behind = mirror_service
    day = timedelta(days=1)
    async with AsyncMetering("sql", url=ledger_url, linger=0) as alone:  # no mirror yet
        await alone.create_meter(event_name="calls")
        await alone.create_meter(event_name="peak", aggregation="max")
        for tenant in ("t0", "t1"):
            await alone.create_customer(id=tenant)
        stored = [
            event(n, customer=f"t{n % 2}", name=("calls", "peak")[n // 2 % 2]).model_copy(
                update={"timestamp": AT + day * (n % 3)}
            )
            for n in range(90)
        ]
        await alone.ingest_usage_events(stored)
        await alone.cancel_usage_events(["e1", "e2"])
    await behind.create_meter(event_name="calls")  # the mirror had one of them already

    async with AsyncMetering("sql", url=ledger_url, mirrors=billing(url), linger=0) as ledger:
        links = await ledger.link_mirror("billing")
        assert sorted((link.kind, link.outcome.value) for link in links) == [
            ("customer", "created"),
            ("customer", "created"),
            ("meter", "created"),  # peak
            ("meter", "linked"),  # calls, found by its event name
        ]
        theirs = {m.event_name: m.id for m in (await behind.fetch_all_meters()).items}
        ours = {m.id: m.event_name for m in (await ledger.fetch_all_meters()).items}
        assert {(link.id, link.mirror_id) for link in links} == {
            ("t0", "t0"),
            ("t1", "t1"),
            *((meter_id, theirs[name]) for meter_id, name in ours.items()),
        }
        span = {"start": AT, "end": AT + 3 * day}
        before = await ledger.reconcile("billing", **span)
        assert not before.ok  # the mirror has none of the history

        assert await ledger.backfill_mirror("billing", start=AT) == 88  # all but cancelled
        [status] = await ledger.flush_mirrors(timeout=30)
        assert (status.depth, status.dead_letters) == (0, 0)
        after = await ledger.reconcile("billing", **span)
        assert after.ok
        assert {c.status for c in after.cells} == {CellStatus.equal}
        assert len(after.cells) == 2 * 2 * 3  # 2 meters x 2 customers x 3 days

        assert await ledger.backfill_mirror("billing", start=AT) == 88  # run again by mistake
        await ledger.flush_mirrors(timeout=30)
        assert mirror_outcomes(url) == {"accepted": 88, "duplicate": 88}  # nothing twice
        assert (await ledger.reconcile("billing", **span)).ok
        with pytest.raises(ValidationError, match="end="):
            await ledger.backfill_mirror("billing", start=AT, end=AT)


async def test_repair_sends_each_short_cell_its_difference_once(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _behind = mirror_service
    await ledger.create_meter(event_name="logins", aggregation="count")
    await ledger.create_meter(event_name="peak", aggregation="max")
    sent = [
        event(n, customer=f"t{n % 2}", name=("calls", "logins", "peak")[n % 3]) for n in range(60)
    ]
    await ledger.ingest_usage_events([*sent, event(300, customer="t9")])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    # lost: calls, 2 logins, peak; and all of t9's (the mirror has no number for it)
    await mirror.cancel_usage_events(["e0", "e1", "e4", "e2", "e300"])
    await mirror.ingest_usage_events([event(100, customer="t1")])  # and one too many
    span = {"start": AT, "end": AT + timedelta(days=1)}
    accepted_before = mirror_outcomes(url)["accepted"]

    # A mirror slow to show what it took (Stripe takes minutes): the second repair sees
    # the numbers from before the first, and sends the same corrections again.
    answers: dict[str, Any] = {}
    asking = mirror.fetch_usage

    async def slow(query: UsageQuery) -> Any:
        key = query.model_dump_json()
        answers.setdefault(key, await asking(query))
        return answers[key]

    monkeypatch.setattr(mirror, "fetch_usage", slow)
    first = await ledger.reconcile("billing", **span, repair=True)
    await ledger.ingest_usage_events([event(200, customer="t0")])  # one more in a repaired cell
    await ledger.flush_mirrors(timeout=30)
    second = await ledger.reconcile("billing", **span, repair=True)  # sees the old numbers
    monkeypatch.setattr(mirror, "fetch_usage", asking)

    def repaired(report: ReconcileReport) -> set[tuple[str, str]]:
        return {(c.event_name, c.customer_id) for c in report.cells if c.repaired}

    assert not first.ok
    assert repaired(first) == {
        ("calls", "t0"),
        ("logins", "t1"),
        ("logins", "t0"),
        ("calls", "t9"),
    }
    # not peak (a max is not summed up), not the over-count
    assert repaired(second) == set()  # a cell repaired lately waits for the mirror to show it
    statuses = {(c.event_name, c.customer_id): c.status for c in second.cells}
    assert statuses[("calls", "t0")] is CellStatus.pending
    assert statuses[("logins", "t0")] is CellStatus.pending
    outcomes = mirror_outcomes(url)
    assert outcomes["accepted"] - accepted_before == 2 + 2 + 1  # two sums, two counted, a late one
    assert "duplicate" not in outcomes

    final = await ledger.reconcile("billing", **span, repair=True)
    left = {(c.event_name, c.customer_id, c.status) for c in final.cells}
    assert ("calls", "t1", CellStatus.over) in left
    assert {(name, status) for name, _, status in left if name != "peak"} == {
        ("calls", CellStatus.equal),
        ("calls", CellStatus.over),
        ("logins", CellStatus.equal),
    }
    assert repaired(final) == set()
    assert mirror_outcomes(url) == outcomes  # nothing more sent


async def test_a_cell_the_mirror_refused_events_of_is_drift_and_never_repaired(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Repairing it, then retrying its dead letters once the cause is fixed, would count
    the refused events twice."""
    url, _ = mirror_service
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    taking = mirror.ingest_usage_events

    async def refusing(batch: Sequence[UsageEvent], **options: Any) -> IngestResult:
        answer = await taking([e for e in batch if e.id != "e2"], **options)
        return answer.model_copy(update={"rejected": {**answer.rejected, "e2": "not today"}})

    monkeypatch.setattr(mirror, "ingest_usage_events", refusing)
    await ledger.ingest_usage_events([event(1), event(2), event(3)])
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.dead_letters == 1
    span = {"start": AT, "end": AT + timedelta(days=1)}

    report = await ledger.reconcile("billing", **span, repair=True)

    assert not report.ok
    [cell] = report.cells
    assert (cell.status, cell.repaired) == (CellStatus.refused, False)
    assert cell.mirror == cell.ledger - event(2).value  # type: ignore[operator]
    monkeypatch.setattr(mirror, "ingest_usage_events", taking)
    assert await ledger.retry_mirror_dead_letters("billing") == 1
    await ledger.flush_mirrors(timeout=30)
    assert (await ledger.reconcile("billing", **span)).ok
    assert mirror_outcomes(url) == {"accepted": 3}


async def test_a_repaired_cell_is_repaired_once_whatever_the_window_and_its_dead_letters_stay(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A correction sits at its window's start: an hourly reconcile of a day repaired
    would see the same shortfall and send it again; and a dead letter of that cell
    (a refusal reported after the repair) retried would count it twice."""
    day = AT.replace(hour=0)
    late = day + timedelta(hours=5)
    await ledger.ingest_usage_events(
        [e.model_copy(update={"timestamp": late}) for e in (event(1), event(2))]
    )
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    await provider.forwarder.mirrors["billing"].cancel_usage_events(["e1"])  # the mirror lost e1
    span = {"start": day, "end": day + timedelta(days=1)}

    daily = await ledger.reconcile("billing", **span, window="day", repair=True)
    hourly = await ledger.reconcile("billing", **span, window="hour", repair=True)

    assert [c.repaired for c in daily.cells] == [True]
    assert not any(c.repaired for c in hourly.cells)
    assert {c.status for c in hourly.cells if c.status is not CellStatus.equal} == {
        CellStatus.pending
    }
    again = await ledger.reconcile("billing", **span, window="day")
    assert [c.status for c in again.cells] == [CellStatus.equal]

    async with provider._transaction() as connection:  # the mirror reports refusing e1
        await connection.execute(
            sa.insert(outbox).values(
                mirror="billing", kind="usage", event_id="e1", created_at=0, refused="late"
            )
        )
    assert await ledger.retry_mirror_dead_letters("billing") == 0  # the repair stands for it
    assert [c.status for c in (await ledger.reconcile("billing", **span)).cells] == [
        CellStatus.equal
    ]


async def test_an_event_stored_while_reconcile_runs_is_pending_not_repaired(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Stored after reconcile began and before it counted that meter, the event is in the
    ledger's total; it must also be seen owed, or it is repaired as lost and then
    delivered by the forwarder too: billed twice (probe)."""
    url, _ = mirror_service
    await ledger.create_meter(event_name="logins")
    await ledger.ingest_usage_events([event(1), event(2, name="logins")])
    await ledger.flush_mirrors(timeout=30)
    order = [m.event_name for m in (await ledger.fetch_all_meters()).items]
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    asking = mirror.fetch_usage
    late = event(3, name=order[-1])  # of the meter compared last

    async def meanwhile(query: UsageQuery) -> Any:
        answer = await asking(query)
        if late.id not in {e.id for e in stored}:  # another process stores it, once
            stored.append(late)
            await provider.ingest_usage_events([late])
        return answer

    stored: list[UsageEvent] = []
    mirror.fetch_usage = meanwhile  # type: ignore[method-assign]
    span = {"start": AT, "end": AT + timedelta(days=1)}
    report = await ledger.reconcile("billing", **span, repair=True)
    mirror.fetch_usage = asking  # type: ignore[method-assign]

    assert stored == [late]
    assert not any(c.repaired for c in report.cells)
    assert {c.event_name: c.status for c in report.cells}[order[-1]] is CellStatus.pending
    await ledger.flush_mirrors(timeout=30)
    after = await ledger.reconcile("billing", **span)
    assert {c.status for c in after.cells} == {CellStatus.equal}
    assert "duplicate" not in mirror_outcomes(url)
    assert mirror_outcomes(url)["accepted"] == 3


async def test_a_cancellation_that_reaches_the_mirror_while_reconcile_runs_is_not_repaired_back(
    ledger: AsyncMetering,
) -> None:
    """Cancelled and forwarded after the ledger's total was read and before the mirror
    answered: the mirror is short of a total that no longer holds (review)."""
    await ledger.ingest_usage_events([event(1), event(2)])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    asking = mirror.fetch_usage

    async def meanwhile(query: UsageQuery) -> Any:
        if not cancelled:
            cancelled.append(await provider.cancel_usage_events(["e1"]))
            await provider.flush_mirrors(timeout=30)
        return await asking(query)

    cancelled: list[Any] = []
    mirror.fetch_usage = meanwhile  # type: ignore[method-assign]
    span = {"start": AT, "end": AT + timedelta(days=1)}
    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
    mirror.fetch_usage = asking  # type: ignore[method-assign]

    assert (cell.status, cell.repaired) == (CellStatus.pending, False)
    [cell] = (await ledger.reconcile("billing", **span)).cells
    assert cell.status is CellStatus.equal
    assert cell.mirror == event(2).value


async def test_a_cancellation_still_owed_makes_its_cell_pending_and_its_loss_is_repaired_after(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Before it is forwarded the mirror still bills the cancelled event: not drift, and a
    repair then would be short by it once it is (probe)."""
    await ledger.ingest_usage_events([event(1), event(2), event(3)])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    await provider.forwarder.mirrors["billing"].cancel_usage_events(["e3"])  # the mirror lost e3
    await ledger.cancel_usage_events(["e1"])  # owed, not forwarded yet
    span = {"start": AT, "end": AT + timedelta(days=1)}

    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells

    assert (cell.status, cell.repaired) == (CellStatus.pending, False)
    await ledger.flush_mirrors(timeout=30)
    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (cell.status, cell.repaired) == (CellStatus.short, True)
    assert cell.ledger is not None
    assert cell.mirror is not None
    assert cell.ledger - cell.mirror == event(3).value
    [cell] = (await ledger.reconcile("billing", **span)).cells
    assert cell.status is CellStatus.equal


async def mirror_stating(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch, **stated: Any
) -> tuple[SqlProvider, IMetering]:
    """The ledger's store and its `billing` mirror, which now states `stated` among its
    capabilities (a processing delay, a window it remembers ids for)."""
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    capabilities = (await mirror.load_capabilities()).model_copy(update=stated)

    async def stating() -> Capabilities:
        return capabilities

    monkeypatch.setattr(mirror, "load_capabilities", stating)
    return provider, mirror


async def delayed_mirror(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch, delay: timedelta
) -> tuple[SqlProvider, IMetering]:
    """The ledger's store and its `billing` mirror, which now states a processing delay."""
    return await mirror_stating(ledger, monkeypatch, processing_delay=delay)


async def age_deliveries(provider: SqlProvider, by: timedelta) -> None:
    """Every delivery mark made `by` earlier: time passes for the processing delay."""
    async with provider._transaction() as connection:
        await connection.execute(
            sa.update(mirror_deliveries).values(
                delivered_at=mirror_deliveries.c.delivered_at - by // timedelta(microseconds=1)
            )
        )


async def test_a_window_delivered_to_within_the_mirrors_processing_delay_is_not_repaired(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mirror that shows what it took only after a delay (Stripe aggregates
    asynchronously): a reconcile right after delivery read the cell short, and a repair
    then was billed beside the events once the mirror caught up. A cell events were
    delivered to within the delay is pending; one delivered to before it, short of an
    event the mirror lost, is repaired, whatever other customers' events of its hour were
    delivered since (review: one span a pass held every cell between its events pending,
    and a short mirror read ok); once the delay has passed, the first is repaired too."""
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    await ledger.ingest_usage_events([event(1), event(2), event(4000)])  # hours 1 and 2
    await ledger.flush_mirrors(timeout=30)

    async def deliveries() -> int:
        async with provider._transaction(writes=False) as connection:
            return int(
                await connection.scalar(sa.select(sa.func.count()).select_from(mirror_deliveries))
            )

    assert await deliveries() == 0  # a mirror that shows at once: nothing to wait for
    await delayed_mirror(ledger, monkeypatch, timedelta(minutes=5))

    # acme's hour 1 again, and another customer's hour 2, delivered now
    await ledger.ingest_usage_events([event(3), event(7000, customer="zed")])
    await ledger.flush_mirrors(timeout=30)
    assert await deliveries() == 2
    await mirror.cancel_usage_events(["e1", "e4000"])  # e1 not shown yet; e4000 lost
    span = {"start": AT, "end": AT + timedelta(hours=2), "window": "hour"}
    first = await ledger.reconcile("billing", **span, repair=True)
    assert [(c.customer_id, c.start - AT, c.status, c.repaired) for c in first.cells] == [
        ("acme", timedelta(0), CellStatus.pending, False),
        ("acme", timedelta(hours=1), CellStatus.short, True),
        ("zed", timedelta(hours=1), CellStatus.equal, False),
    ]

    await age_deliveries(provider, timedelta(minutes=6))  # the delay has passed for hour 1
    second = await ledger.reconcile("billing", **span, repair=True)
    assert [(c.customer_id, c.start - AT, c.status, c.repaired) for c in second.cells] == [
        ("acme", timedelta(0), CellStatus.short, True),
        ("acme", timedelta(hours=1), CellStatus.equal, False),  # the correction shows at once
        ("zed", timedelta(hours=1), CellStatus.equal, False),
    ]
    assert await totals(mirror_service[1]) == await totals(ledger)

    await age_deliveries(
        provider, timedelta(minutes=10)
    )  # 16 minutes on: past three delays, forgotten at the next delivery
    provider.forwarder._forgotten.clear()  # (at most once a quarter of the delay)
    await ledger.ingest_usage_events([event(5)])
    await ledger.flush_mirrors(timeout=30)
    assert await deliveries() == 1


async def test_a_cancel_the_mirror_took_within_its_processing_delay_is_pending_not_over(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stripe processes a cancellation (an adjustment) asynchronously too: meanwhile the
    cell reads over, and was reported drift for the delay (review)."""
    provider, mirror = await delayed_mirror(ledger, monkeypatch, timedelta(minutes=5))
    await ledger.ingest_usage_events([event(1), event(2)])
    await ledger.flush_mirrors(timeout=30)
    await age_deliveries(provider, timedelta(hours=1))  # delivered long ago
    await ledger.cancel_usage_events(["e2"])
    await ledger.flush_mirrors(timeout=30)
    await mirror.ingest_usage_events([event(900)])  # as if e2 still counted there
    report = await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))
    assert report.ok
    assert [c.status for c in report.cells] == [CellStatus.pending]


async def test_the_processing_delay_counts_from_when_the_mirror_was_asked(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror slow to answer (Stripe, asked customer by customer): the delay is counted
    back from when it was asked, not from its answer (review: a cell delivered to 0.1 s
    before asking a mirror with a 2 s delay, answered after 2.5 s, was repaired); once
    the delay has passed, the loss is repaired."""
    provider, mirror = await delayed_mirror(ledger, monkeypatch, timedelta(seconds=2))
    await ledger.ingest_usage_events([event(1), event(2)])
    await ledger.flush_mirrors(timeout=30)
    await mirror.cancel_usage_events(["e1"])  # not shown yet
    asking = mirror.fetch_usage

    async def slowly(query: UsageQuery) -> Any:
        answer = await asking(query)
        await asyncio.sleep(2.5)
        return answer

    monkeypatch.setattr(mirror, "fetch_usage", slowly)
    span = {"start": AT, "end": AT + timedelta(days=1)}
    report = await ledger.reconcile("billing", **span, repair=True)
    assert [(c.status, c.repaired) for c in report.cells] == [(CellStatus.pending, False)]
    monkeypatch.setattr(mirror, "fetch_usage", asking)
    await age_deliveries(provider, timedelta(seconds=3))  # the delay passes
    report = await ledger.reconcile("billing", **span, repair=True)
    assert [(c.status, c.repaired) for c in report.cells] == [(CellStatus.short, True)]


@contextlib.contextmanager
def host_clock(by: timedelta) -> Iterator[None]:
    """This host's clock `by` off, as the modules that stamp and compare times read it
    (`datetime.now`, `time.time_ns`): another host's, in this process."""

    class Skewed(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + by

    real_ns = time.time_ns
    with pytest.MonkeyPatch.context() as patch:
        for module in (sql_ingest, sql_provider, mirrors, reconcile_module, store_clock):
            if hasattr(module, "datetime"):
                patch.setattr(module, "datetime", Skewed)
        patch.setattr(time, "time_ns", lambda: real_ns() + by // timedelta(microseconds=1) * 1000)
        yield


@pytest.mark.parametrize("ledger_url", ["postgres_url"], indirect=True)
@pytest.mark.parametrize("skewed", ["forwarder", "reconcile"])
async def test_hosts_whose_clocks_are_hours_apart_agree_a_cell_is_still_processing(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch, skewed: str
) -> None:
    """A forwarder and a reconcile on hosts whose clocks disagree by two hours (one set to
    local time): a cell delivered to just now, on a mirror that shows what it took an
    hour later, is pending, not short (whose repair would be billed beside the events
    once the mirror showed them). Marks and the times compared with them are the
    store's; once its delay has passed the loss is repaired."""
    provider, mirror = await delayed_mirror(ledger, monkeypatch, timedelta(hours=1))
    with host_clock(timedelta(hours=-2)):
        await ledger.ingest_usage_events([event(1), event(2)])
        await ledger.flush_mirrors(timeout=30)
    with host_clock(timedelta(hours=2 if skewed == "reconcile" else 0)):
        await mirror.cancel_usage_events(["e1"])  # not shown there yet
        span = {"start": AT, "end": AT + timedelta(days=1)}
        report = await ledger.reconcile("billing", **span, repair=True)
    assert [(c.status, c.repaired) for c in report.cells] == [(CellStatus.pending, False)]
    await age_deliveries(provider, timedelta(hours=1, minutes=1))
    report = await ledger.reconcile("billing", **span, repair=True)
    assert [(c.status, c.repaired) for c in report.cells] == [(CellStatus.short, True)]


@pytest.mark.parametrize("ledger_url", ["postgres_url"], indirect=True)
async def test_an_ingesting_host_behind_does_not_make_a_backfill_send_its_events_again(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror that forgets ids (Stripe) is backfilled only events stored before it was
    added: stamped by the ingesting host's clock two hours behind, events stored after
    read as older, and a backfill owed them again, counted twice once the mirror forgot
    their ids (review). Both times are the store's."""
    await mirror_stating(ledger, monkeypatch, dedupe_window=timedelta(hours=24))
    recent = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    with host_clock(timedelta(hours=-2)):
        await ledger.ingest_usage_events([event(1).model_copy(update={"timestamp": recent})])
        await ledger.flush()  # stored on that host
    await ledger.flush_mirrors(timeout=30)
    assert await ledger.backfill_mirror("billing", start=recent - timedelta(hours=1)) == 0


async def test_a_refusal_reader_written_before_replays_were_checked_still_reads(
    ledger: AsyncMetering,
) -> None:
    """`ReportsRefusals.read_refusal_notice` gained `recorded=`; a mirror plugin with the
    older two-argument method is called as before, not failed with a TypeError (review),
    and the ledger still records each notice once."""

    class Older(MemoryProvider):
        async def read_refusal_notice(
            self, body: bytes, headers: Mapping[str, str]
        ) -> RefusalNotice:
            return RefusalNotice(id="n1", kind="refused", error_count=1, refused={"e1": "no"})

    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    await ledger.ingest_usage_events([event(1)])
    await ledger.flush_mirrors(timeout=30)
    provider.forwarder.mirrors["billing"] = Older()
    assert await provider.receive_notice("memory", b"{}", {}) == 1
    assert await provider.receive_notice("memory", b"{}", {}) == 0


async def test_a_store_that_forwarded_before_it_noted_mirrors_asks_when_before_a_backfill(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store forwarding at 0004, before it noted when each mirror was added, upgraded:
    the mirror was noted as added at the upgrade, and a backfill of a mirror that forgets
    ids (Stripe) sent again every event it had had, billed twice (probe). When is now
    unknown there, and a backfill asks for it; once told, it is kept."""
    url, _ = mirror_service
    async with AsyncMetering("sql", url=ledger_url, linger=0) as before:
        await before.create_meter(event_name="calls")
        await before.ingest_usage_events([event(0)])  # before the mirror was configured
    configured = datetime.now(UTC)
    options = {"mirrors": billing(url), "linger": 0, "mirror_forwarder": False}
    async with AsyncMetering("sql", url=ledger_url, **options) as ledger:
        await ledger.ingest_usage_events([event(1), event(2)])
        await ledger.flush_mirrors(timeout=30)  # forwarded: their outbox rows are gone
    plain = SqlProvider(SqlSettings(url=ledger_url))
    async with plain._transaction() as connection:
        await connection.run_sync(lambda c: command.downgrade(alembic_config(c), "0004"))
    if ledger_url.startswith("postgresql"):
        async with AsyncMetering("sql", url=ledger_url, auto_upgrade=True) as upgrading:
            await upgrading.fetch_all_meters()  # `metering db upgrade`, no mirror configured

    async def noted() -> dict[str, int | None]:
        async with plain._transaction(writes=False) as connection:
            return {name: at for name, at in await connection.execute(sa.select(schema_mirrors))}

    async with AsyncMetering("sql", url=ledger_url, **options) as first:
        await first.fetch_all_meters()  # a process with one of the mirrors it had (review)
    both = {**options, "mirrors": {**billing(url), "audit": billing(url)["billing"]}}
    async with AsyncMetering("sql", url=ledger_url, **both) as second:
        await second.fetch_all_meters()
        assert await noted() == {"billing": None, "audit": None}
    async with AsyncMetering("sql", url=ledger_url, **options) as ledger:
        await mirror_stating(ledger, monkeypatch, dedupe_window=timedelta(hours=24))
        with pytest.raises(ValidationError, match="was added is unknown") as unknown:
            await ledger.backfill_mirror("billing", start=AT - timedelta(hours=1))
        assert unknown.value.field == "mirror_added"
        owed = await ledger.backfill_mirror(
            "billing", start=AT - timedelta(hours=1), mirror_added=configured
        )
        assert owed == 1  # e0 alone: e1 and e2 it had
        assert await noted() == {"billing": epoch_micros(configured), "audit": None}  # kept
        later = {"start": AT + timedelta(days=1)}
        with pytest.raises(ValidationError, match="noted as added at"):
            await ledger.backfill_mirror("billing", **later, mirror_added=AT)
        with pytest.raises(ValidationError, match="later than now"):
            await ledger.backfill_mirror(
                "billing", **later, mirror_added=datetime.now(UTC) + timedelta(days=1)
            )
    async with plain._transaction() as connection:
        await connection.run_sync(lambda c: command.downgrade(alembic_config(c), "0010"))
    assert (await noted())["audit"] == 1  # the older code then backfills it nothing
    await plain.aclose()


async def test_a_mirror_added_time_given_for_a_mirror_that_remembers_ids_is_checked(
    ledger: AsyncMetering,
) -> None:
    """Such a backfill sends every event of the range (the mirror answers duplicate for
    those it has), so the time goes unused: it was ignored, a wrong one unseen (re-read);
    it is checked as for any mirror."""
    start = AT - timedelta(hours=1)
    with pytest.raises(ValidationError, match="noted as added at") as wrong:
        await ledger.backfill_mirror("billing", start=start, mirror_added=AT)
    assert wrong.value.field == "mirror_added"
    assert await ledger.backfill_mirror("billing", start=start) == 0


@pytest.mark.parametrize(
    ("looked_at", "used", "made"), [(100, True, True), (100, False, False), (3, False, True)]
)
async def test_a_customer_gone_is_made_on_the_mirror_when_its_usage_may_be_owed(
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
    looked_at: int,
    used: bool,
    made: bool,
) -> None:
    """A customer made and gone before the forwarder ran is made on the mirror, by id,
    when usage of it is owed after its change, or may be: a backlog is looked through
    only so far (review: read whole, it outlasted the statement timeout and stopped the
    mirror for good). One with no usage owed is not made."""
    monkeypatch.setattr(mirrors, "OWED_LOOKED_AT", looked_at)
    await ledger.create_customer(id="gone")
    others = [event(n, customer=f"other-{n}") for n in range(5)]
    await ledger.ingest_usage_events(others + ([event(9, customer="gone")] if used else []))
    await ledger.delete_customer("gone")
    [status] = await ledger.flush_mirrors(timeout=30)
    assert (status.depth, status.dead_letters) == (0, 0)
    behind = mirror_service[1].provider
    assert isinstance(behind, MemoryProvider)
    assert ("gone" in behind._customers) is made


async def test_a_second_loss_to_the_same_totals_is_repaired_with_new_ids(
    ledger: AsyncMetering,
) -> None:
    """Ledger 15 and mirror 10 twice, by other events: the first repair's ids were given
    again, the mirror answered duplicate, and the cell was marked repaired and stayed
    short for good (probe). Each loss is repaired; each repair, twice, sends once."""
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    day = AT.replace(hour=0)
    span = {"start": day, "end": day + timedelta(days=1)}
    five = [event(n) for n in (4, 9, 14, 19)]  # each of value 5
    await ledger.ingest_usage_events(five[:3])
    await ledger.flush_mirrors(timeout=30)
    await mirror.cancel_usage_events(["e14"])  # lost there
    [first] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (first.ledger, first.mirror, first.repaired) == (15, 10, True)

    async def a_while_later() -> None:
        async with provider._transaction() as connection:
            hours = 2 * 3_600_000_000
            await connection.execute(
                sa.update(mirror_repairs).values(sent_at=mirror_repairs.c.sent_at - hours)
            )

    await a_while_later()
    await ledger.cancel_usage_events(["e4"])  # reaches the mirror: 10 and 10
    await ledger.ingest_usage_events([five[3]])
    await ledger.flush_mirrors(timeout=30)
    await mirror.cancel_usage_events(["e19"])  # lost there: 15 and 10 again
    [second] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (second.ledger, second.mirror, second.repaired) == (15, 10, True)
    await a_while_later()
    [after] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (after.status, after.ledger, after.mirror) == (CellStatus.equal, 15, 15)


async def two_the_mirror_lacks(ledger: AsyncMetering, ledger_url: str) -> dict[str, datetime]:
    """The mirror has e1; e2 and e3 were stored by a process without it configured. The
    span of the day they fall in."""
    await ledger.ingest_usage_events([event(1)])
    await ledger.flush_mirrors(timeout=30)
    async with AsyncMetering("sql", url=ledger_url, linger=0) as unmirrored:
        await unmirrored.ingest_usage_events([event(2), event(3)])
    day = AT.replace(hour=0)
    return {"start": day, "end": day + timedelta(days=1)}


async def test_a_backfill_committed_while_a_repair_runs_is_sent_and_the_repair_is_not(
    ledger_url: str,
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event lost to the mirror (stored by a process without it configured), and a
    backfill that commits after reconcile read what was owed and before it recorded its
    repair: both reached the mirror, the shortfall billed twice (probe). The repair now
    sees the rows owed meanwhile and leaves the cell to them."""
    span = await two_the_mirror_lacks(ledger, ledger_url)
    day = span["start"]
    recording = reconcile_module._record
    owed: list[int] = []

    async def backfilled_meanwhile(*args: Any, **kwargs: Any) -> set[int]:
        owed.append(await ledger.backfill_mirror("billing", start=day, end=span["end"]))
        return await recording(*args, **kwargs)

    monkeypatch.setattr(reconcile_module, "_record", backfilled_meanwhile)
    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (cell.status, cell.repaired, owed) == (CellStatus.short, False, [3])
    monkeypatch.setattr(reconcile_module, "_record", recording)
    await ledger.flush_mirrors(timeout=30)
    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (cell.status, cell.ledger, cell.mirror) == (CellStatus.equal, 9, 9)
    assert await totals(mirror_service[1]) == await totals(ledger)


async def test_rows_owed_without_the_events_seq_hold_a_repair_back_too(
    ledger_url: str,
    ledger: AsyncMetering,
    mirror_service: tuple[str, AsyncMetering],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows owed by a process still on 0008 name their event by id alone: owed while a
    repair is recorded, the repair looked for them by seq, found none, and the mirror
    got the shortfall twice, as the correction and as the events."""
    span = await two_the_mirror_lacks(ledger, ledger_url)
    day = span["start"]
    recording = reconcile_module._record

    async def owed_by_an_older_process(*args: Any, **kwargs: Any) -> set[int]:
        assert await ledger.backfill_mirror("billing", start=day, end=span["end"]) == 3
        provider = ledger.provider
        assert isinstance(provider, SqlProvider)
        async with provider._transaction() as connection:
            await connection.execute(sa.update(outbox).values(event_seq=None))
        return await recording(*args, **kwargs)

    monkeypatch.setattr(reconcile_module, "_record", owed_by_an_older_process)
    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (cell.status, cell.repaired) == (CellStatus.short, False)
    monkeypatch.setattr(reconcile_module, "_record", recording)
    await ledger.flush_mirrors(timeout=30)
    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert (cell.status, cell.ledger, cell.mirror) == (CellStatus.equal, 9, 9)
    assert await totals(mirror_service[1]) == await totals(ledger)


@pytest.mark.parametrize("ledger_url", ["postgres_url"], indirect=True)
async def test_backfills_and_retries_wait_for_a_repair_being_recorded(
    ledger: AsyncMetering,
) -> None:
    """On PostgreSQL a backfill's check of the repairs and a repair's check of the owed
    rows, at once, would each miss the other's: they take the mirror's turn in one lock."""
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    day = AT.replace(hour=0)
    async with provider._transaction() as connection:
        await reconcile_module.one_repair_at_a_time(connection, "billing")
        backfill = asyncio.create_task(
            ledger.backfill_mirror("billing", start=day, end=day + timedelta(days=1))
        )
        retry = asyncio.create_task(ledger.retry_mirror_dead_letters("billing"))
        done, _ = await asyncio.wait([backfill, retry], timeout=0.5)
        assert not done
    assert await asyncio.wait_for(backfill, 10) == 0
    assert await asyncio.wait_for(retry, 10) == 0


async def test_a_meter_link_refused_holds_its_events_back_and_reconcile_says_so(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """The mirror has `calls` aggregating max; the ledger's, made before the mirror was
    added, sums. Linking refused it, yet its events went there and were billed by max,
    and reconcile called the cells not comparable, ok (probe). The refusal is now the
    meter's dead letter: its events are refused with it and reconcile reports them;
    once the mirror's meter is fixed, a link clears it and a retry sends them."""
    url, behind = mirror_service
    await behind.create_meter(event_name="calls", aggregation="max")
    async with AsyncMetering("sql", url=ledger_url, linger=0) as before:
        await before.create_meter(event_name="calls")
    async with AsyncMetering(
        "sql", url=ledger_url, mirrors=billing(url), linger=0, mirror_forwarder=False
    ) as ledger:
        [link] = await ledger.link_mirror("billing")
        assert link.outcome is LinkOutcome.refused
        await ledger.ingest_usage_events([event(1), event(2)])
        [status] = await ledger.flush_mirrors(timeout=30)
        assert (status.depth, status.dead_letters) == (0, 3)  # the meter, its two events
        [theirs] = (await behind.fetch_all_meters()).items
        usage = await behind.fetch_usage(
            theirs.id, start=AT, end=AT + timedelta(hours=1), window="hour"
        )
        assert usage.rows == []
        span = {"start": AT.replace(hour=0), "end": AT.replace(hour=0) + timedelta(days=1)}
        report = await ledger.reconcile("billing", **span)
        assert not report.ok
        assert [c.status for c in report.cells] == [CellStatus.refused]

        await behind.delete_meter(theirs.id)  # the mirror's meter fixed
        [link] = await ledger.link_mirror("billing")
        assert link.outcome is LinkOutcome.created
        assert await ledger.retry_mirror_dead_letters("billing") == 2
        await ledger.flush_mirrors(timeout=30)
        [cell] = (await ledger.reconcile("billing", **span)).cells
        assert (cell.status, cell.mirror) == (CellStatus.equal, 5)


async def test_two_reconciles_repairing_at_once_in_other_windows_send_the_shortfall_once(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A daily and an hourly cron: each read the repairs, found none and sent its own
    correction (other ids), the shortfall twice, before either recorded it (probe)."""
    url, _ = mirror_service
    async with (
        AsyncMetering("sql", url=ledger_url, mirrors=billing(url), mirror_forwarder=False) as one,
        AsyncMetering("sql", url=ledger_url, mirrors=billing(url), mirror_forwarder=False) as two,
    ):
        await one.create_meter(event_name="calls")
        await one.ingest_usage_events([event(1), event(2)])
        await one.flush_mirrors(timeout=30)
        provider = one.provider
        assert isinstance(provider, SqlProvider)
        await provider.forwarder.mirrors["billing"].cancel_usage_events(["e2"])  # lost e2
        day = AT.replace(hour=0)
        span = {"start": day, "end": day + timedelta(days=1)}

        daily, hourly = await asyncio.gather(
            one.reconcile("billing", **span, window="day", repair=True),
            two.reconcile("billing", **span, window="hour", repair=True),
        )

        assert len([c for c in (*daily.cells, *hourly.cells) if c.repaired]) == 1
        [cell] = (await one.reconcile("billing", **span)).cells
        assert cell.ledger == cell.mirror == event(1).value + event(2).value
        assert mirror_outcomes(url)["accepted"] == 3  # two events and one correction


async def test_a_backfill_after_a_repair_sends_only_what_the_repair_did_not(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A scheduled `reconcile --repair` ran before the operator's backfill: the correction
    holds the events stored before the mirror was added, and sent as well they counted
    twice (probe). An event stored after the repair counted its cell is still owed."""
    url, _ = mirror_service
    async with AsyncMetering("sql", url=ledger_url, linger=0) as alone:  # no mirror yet
        await alone.create_meter(event_name="calls")
        await alone.ingest_usage_events([event(1), event(2)])
    async with AsyncMetering("sql", url=ledger_url, mirrors=billing(url), linger=0) as ledger:
        await ledger.link_mirror("billing")
        await ledger.flush_mirrors(timeout=30)
        span = {"start": AT.replace(hour=0), "end": AT.replace(hour=0) + timedelta(days=1)}
        [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
        assert (cell.status, cell.repaired) == (CellStatus.short, True)

        assert await ledger.backfill_mirror("billing", start=span["start"]) == 0
        await ledger.flush_mirrors(timeout=30)

    async with AsyncMetering("sql", url=ledger_url, linger=0) as alone:  # an old process
        await alone.ingest_usage_events([event(3)])
    async with AsyncMetering("sql", url=ledger_url, mirrors=billing(url), linger=0) as ledger:
        assert await ledger.backfill_mirror("billing", start=span["end"] - timedelta(hours=1)) == 0
        assert (
            await ledger.backfill_mirror(
                "billing", start=span["start"], end=span["end"] - timedelta(hours=1)
            )
            == 1
        )  # e3, stored after the repair
        await ledger.flush_mirrors(timeout=30)
        [cell] = (await ledger.reconcile("billing", **span)).cells
        assert cell.status is CellStatus.equal
        assert cell.ledger == cell.mirror == sum(event(n).value for n in (1, 2, 3))


async def test_a_dead_letter_of_an_event_stored_after_a_repair_is_retried(
    ledger: AsyncMetering,
) -> None:
    """The repair holds only what it counted: an event of the cell stored later and
    refused was kept a dead letter for good, and never billed (probe)."""
    await ledger.ingest_usage_events([event(1), event(2)])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    await mirror.cancel_usage_events(["e1"])  # the mirror lost e1
    span = {"start": AT, "end": AT + timedelta(days=1)}
    [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
    assert cell.repaired
    taking = mirror.ingest_usage_events

    async def refusing(batch: Sequence[UsageEvent], **options: Any) -> IngestResult:
        answer = await taking([e for e in batch if e.id != "e3"], **options)
        return answer.model_copy(update={"rejected": {**answer.rejected, "e3": "not today"}})

    mirror.ingest_usage_events = refusing  # type: ignore[method-assign]
    await ledger.ingest_usage_events([event(3)])
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.dead_letters == 1
    mirror.ingest_usage_events = taking  # type: ignore[method-assign]

    assert await ledger.retry_mirror_dead_letters("billing") == 1
    await ledger.flush_mirrors(timeout=30)
    [cell] = (await ledger.reconcile("billing", **span)).cells
    assert cell.ledger == cell.mirror == sum(event(n).value for n in (1, 2, 3))


async def test_a_repair_recorded_before_0008_holds_what_was_stored_before_it_was_sent(
    ledger: AsyncMetering,
) -> None:
    """Records made before migration 0008 have no `counted_through`: their `sent_at`
    stands in, against each event's `ingested_at`."""
    await ledger.ingest_usage_events([event(1), event(2)])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    await provider.forwarder.mirrors["billing"].cancel_usage_events(["e1"])  # lost e1
    span = {"start": AT, "end": AT + timedelta(days=1)}
    assert [c.repaired for c in (await ledger.reconcile("billing", **span, repair=True)).cells]
    await ledger.ingest_usage_events([event(3)])
    await ledger.flush()
    async with provider._transaction() as connection:
        stamped = dict(
            (await connection.execute(sa.select(events.c.id, events.c.ingested_at))).all()
        )
        await connection.execute(  # as an older version recorded it: sent before e3
            sa.update(mirror_repairs).values(counted_through=None, sent_at=stamped["e3"])
        )
        for event_id in ("e1", "e3"):  # the mirror reports refusing both
            await connection.execute(sa.delete(outbox).where(outbox.c.event_id == event_id))
            await connection.execute(
                sa.insert(outbox).values(
                    mirror="billing", kind="usage", event_id=event_id, created_at=0, refused="late"
                )
            )

    assert await ledger.retry_mirror_dead_letters("billing") == 1  # e3; the repair holds e1
    async with provider._transaction(writes=False) as connection:
        assert (
            await connection.scalar(
                sa.select(outbox.c.event_id).where(outbox.c.refused.is_not(None))
            )
            == "e1"
        )


async def pairs(connection: Any, key: Any, value: Any, *where: Any) -> dict[Any, Any]:
    return {row[0]: row[1] for row in await connection.execute(sa.select(key, value).where(*where))}


USAGE_ROWS = outbox.c.kind == "usage"


async def test_rows_owed_without_the_events_seq_are_read_by_id_beside_those_with_it(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Rows owed by a process still on 0008 have no `event_seq`, and a store copied with
    its events renumbered would have wrong ones: a pass holding such rows beside sound
    ones reads its events by id, and each event reaches the mirror once (read by seq
    alone, the first were dead letters, "no longer stored", and the last sent another
    event)."""
    await ledger.ingest_usage_events([event(n) for n in range(1, 9)])
    await ledger.flush()
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    async with provider._transaction() as connection:
        owed = await pairs(connection, outbox.c.event_id, outbox.c.event_seq, USAGE_ROWS)
        stored = await pairs(connection, events.c.id, events.c.seq)
        assert owed == stored  # as ingest writes them: each with its event's seq
        await connection.execute(
            sa.update(outbox)
            .where(outbox.c.event_id.in_(["e2", "e5", "e8"]))
            .values(event_seq=None)
        )
        await connection.execute(  # e3's row names e4's place
            sa.update(outbox).where(outbox.c.event_id == "e3").values(event_seq=stored["e4"])
        )
    await ledger.flush_mirrors(timeout=30)
    assert (await ledger.mirror_status())[0].dead_letters == 0
    assert await totals(mirror_service[1]) == await totals(ledger)
    listed = await mirror_service[1].list_usage_events(
        event_name="calls", start=AT, end=AT + timedelta(days=1)
    )
    assert sorted(e.id for e in listed.items) == sorted(f"e{n}" for n in range(1, 9))


async def test_a_row_whose_seq_names_an_event_it_does_not_owe_sends_its_own(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A seq naming another event (a store copied with its events renumbered), one this
    pass does not owe: the mirror gets the owed event, not that one."""
    await ledger.ingest_usage_events([event(n) for n in range(1, 5)])
    await ledger.flush()
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    async with provider._transaction() as connection:
        stored = await pairs(connection, events.c.id, events.c.seq)
        await connection.execute(sa.delete(outbox).where(outbox.c.event_id == "e4"))  # sent
        await connection.execute(
            sa.update(outbox).where(outbox.c.event_id == "e3").values(event_seq=stored["e4"])
        )
    await ledger.flush_mirrors(timeout=30)
    listed = await mirror_service[1].list_usage_events(
        event_name="calls", start=AT, end=AT + timedelta(days=1)
    )
    assert [e.id for e in listed.items] == ["e1", "e2", "e3"]


async def test_migration_0009_gives_rows_owed_before_it_their_events_seq(ledger_url: str) -> None:
    """A store at 0008 owing events (rows with no `event_seq`), upgraded: each row has
    its event's seq, and a row whose event is gone has none (the forwarder refuses it)."""
    from alembic import command

    from metering_core.sql.store import _config

    provider = SqlProvider(SqlSettings(url=ledger_url, mirrors=billing("http://127.0.0.1:9")))
    try:
        await provider.create_meter(MeterCreate(event_name="calls"))
        await provider.ingest_usage_events([event(n) for n in range(1, 5)])
        async with provider._transaction() as connection:
            await connection.run_sync(lambda c: command.downgrade(_config(c), "0008"))
            await connection.execute(  # an event the ledger no longer holds, still owed
                sa.insert(outbox).values(
                    mirror="billing", kind="usage", event_id="gone", created_at=0
                )
            )
            await connection.run_sync(lambda c: command.upgrade(_config(c), "head"))
            owed = await pairs(connection, outbox.c.event_id, outbox.c.event_seq, USAGE_ROWS)
            stored = await pairs(connection, events.c.id, events.c.seq)
        assert owed == {**stored, "gone": None}
    finally:
        await provider.aclose()


async def test_a_tenant_keys_events_reach_an_http_mirror_whose_key_may_replicate_them(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """The ledger holds a tenant-bound key's events under tenant-<hash> ids, which a
    metering service refuses from keys that may not replicate (probe: every tenant's
    event was a dead letter of an HTTP mirror for good). Refused with the scope named,
    and delivered once the mirror's key has it."""
    url, _ = mirror_service
    stored = "tenant-" + "ab" * 24  # as the ledger's service stores a tenant's event
    tenant_event = event(1).model_copy(update={"id": stored})
    plain = {"billing": {"provider": "http", "base_url": url, "api_key": "admin"}}
    async with AsyncMetering("sql", url=ledger_url, mirrors=plain, linger=0) as ledger:
        await ledger.create_meter(event_name="calls")
        await ledger.ingest_usage_events([tenant_event, event(2)])
        [status] = await ledger.flush_mirrors(timeout=30)
        assert status.dead_letters == 1
        provider = ledger.provider
        assert isinstance(provider, SqlProvider)
        async with provider._transaction(writes=False) as connection:
            reason = await connection.scalar(sa.select(outbox.c.refused))
        assert "'usage:replicate'" in reason
    replicating = {"billing": {**plain["billing"], "api_key": "replicator"}}
    async with AsyncMetering("sql", url=ledger_url, mirrors=replicating, linger=0) as ledger:
        assert await ledger.retry_mirror_dead_letters("billing") == 1
        [status] = await ledger.flush_mirrors(timeout=30)
        assert (status.depth, status.dead_letters) == (0, 0)
        [cell] = (await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))).cells
        assert cell.status is CellStatus.equal
        assert cell.mirror == event(1).value + event(2).value


async def test_reconcile_refuses_meter_ids_naming_no_meter_and_windows_it_does_not_know(
    ledger: AsyncMetering,
) -> None:
    """A report of no cells is ok and proves nothing (probe)."""
    span = {"start": AT, "end": AT + timedelta(days=1)}
    [meter] = (await ledger.fetch_all_meters()).items
    for meter_ids, said in ((["nope"], "'nope'"), (["calls"], "'calls'"), ([], "names none")):
        with pytest.raises(ValidationError, match=said) as refused:
            await ledger.reconcile("billing", **span, meter_ids=meter_ids)
        assert refused.value.field == "meter_ids"
    with pytest.raises(ValidationError, match="'week'") as refused:
        await ledger.reconcile("billing", **span, window="week")
    assert refused.value.field == "window"
    assert (await ledger.reconcile("billing", **span, meter_ids=[meter.id])).ok


async def test_a_meter_a_mirror_has_under_another_aggregation_is_refused_at_creation(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    _, behind = mirror_service
    await behind.create_meter(event_name="seats", aggregation="count")
    with pytest.raises(ValidationError, match="aggregating 'count'") as refused:
        await ledger.create_meter(event_name="seats", aggregation="max")
    assert refused.value.field == "aggregation"
    assert [m.event_name for m in (await ledger.fetch_all_meters()).items] == ["calls"]


async def test_changes_reach_the_mirror_one_at_a_time_in_order_however_many_passes_claim(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four passes claiming at once (or two forwarders) must not apply changes side by
    side: on PostgreSQL they would not see each other's uncommitted leases."""
    await ledger.flush_mirrors(timeout=30)
    for n in range(12):
        await ledger.create_customer(id=f"c{n:02d}")
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    creating = mirror.create_customer
    at_once, most, order = 0, 0, []

    async def slow(customer: Any) -> Any:
        nonlocal at_once, most
        at_once += 1
        most = max(most, at_once)
        order.append(customer.id)
        await asyncio.sleep(0.02)
        try:
            return await creating(customer)
        finally:
            at_once -= 1

    monkeypatch.setattr(mirror, "create_customer", slow)
    for _ in range(8):  # two changes a pass, one pass at a time: six rounds are enough
        await asyncio.gather(*(provider.forwarder.forward("billing", limit=2) for _ in range(4)))

    assert most == 1
    assert order == sorted(order)
    assert len(order) == 12


async def test_reconcile_states_cells_only_one_side_has_and_keeps_pending_to_its_meter(
    ledger: AsyncMetering,
) -> None:
    """A cell the ledger has nothing for is over on the mirror (a sum counts it as 0, a
    maximum as absent); one the mirror lost whole is short; and events still owed for
    one meter make that meter's cells pending, not another's."""
    day = timedelta(days=1)
    await ledger.create_meter(event_name="peak", aggregation="max")
    calls, peak = event(1), event(2, name="peak")
    nothing = event(6, customer="t9").model_copy(update={"value": Decimal(0)})
    await ledger.ingest_usage_events([calls, peak, nothing])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    # the mirror lost the day's only maximum, and a sum of nothing (no row there: still 0)
    await mirror.cancel_usage_events([peak.id, nothing.id])
    later = {"timestamp": AT + day}
    await mirror.ingest_usage_events(  # and got a day the ledger has nothing of
        [event(3).model_copy(update=later), event(4, name="peak").model_copy(update=later)]
    )
    await ledger.ingest_usage_events([event(5)])  # owed to the mirror, not yet sent

    report = await ledger.reconcile("billing", start=AT, end=AT + 2 * day)

    found = {(c.event_name, c.start.date(), c.ledger, c.mirror, c.status) for c in report.cells}
    first, second = AT.date(), (AT + day).date()
    assert found == {
        ("calls", first, calls.value + event(5).value, calls.value, CellStatus.pending),
        ("calls", first, Decimal(0), None, CellStatus.equal),
        ("calls", second, None, event(3).value, CellStatus.over),
        ("peak", first, peak.value, None, CellStatus.short),
        ("peak", second, None, event(4).value, CellStatus.over),
    }
    assert not report.ok


async def test_a_later_change_the_mirror_takes_lifts_the_refusal_of_an_earlier_one(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    _, behind = mirror_service
    wrong = await behind.create_meter(event_name="calls", aggregation="count")
    await ledger.ingest_usage_events([event(1)])
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.dead_letters == 2  # the meter, and its event held with it

    await behind.delete_meter(wrong.id)  # fixed on the billing side
    [calls] = (await ledger.fetch_all_meters()).items
    await ledger.update_meter(calls.id, display_name="Calls")  # a change the mirror takes
    await ledger.ingest_usage_events([event(2)])
    [status] = await ledger.flush_mirrors(timeout=30)

    assert status.dead_letters == 1  # the meter's refusal is moot; its event stays refused
    assert await ledger.retry_mirror_dead_letters("billing") == 1
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.dead_letters == 0
    assert await totals(behind) == await totals(ledger)


async def test_a_change_taken_lifts_an_earlier_refusal_set_aside_in_the_same_pass(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    listing = mirror.fetch_all_meters
    refusals = 0

    async def refusing_once(*args: Any, **kwargs: Any) -> Any:  # a refusal: a dead letter
        nonlocal refusals
        if not refusals:
            refusals += 1
            raise ValidationError("not now", field="meter")
        return await listing(*args, **kwargs)

    [calls] = (await ledger.fetch_all_meters()).items
    await ledger.update_meter(calls.id, display_name="Calls")  # a second change of it
    monkeypatch.setattr(mirror, "fetch_all_meters", refusing_once)
    await provider.forwarder.forward("billing")  # both changes, in one pass
    await ledger.ingest_usage_events([event(1)])

    [status] = await ledger.flush_mirrors(timeout=30)

    assert refusals == 1
    assert (status.depth, status.dead_letters) == (0, 0)


async def test_a_change_the_mirror_fails_waits_owed_and_its_events_queue_behind_it(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key without a scope, or a bug, is a failure, not a refusal: however often it is
    tried, nothing becomes a dead letter, and the events wait to be sent once it passes."""
    from metering_core import AuthenticationError

    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    listing = mirror.fetch_all_meters

    async def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AuthenticationError("this key lacks the scope", provider="http")

    monkeypatch.setattr(mirror, "fetch_all_meters", forbidden)
    await ledger.ingest_usage_events([event(1)])
    await ledger.flush()
    for _ in range(15):
        assert await provider.forwarder.forward("billing") == 0
    [status] = await ledger.mirror_status()
    assert (status.depth, status.dead_letters) == (2, 0)  # the meter, then its event

    monkeypatch.setattr(mirror, "fetch_all_meters", listing)
    [status] = await ledger.flush_mirrors(timeout=30)
    assert (status.depth, status.dead_letters) == (0, 0)


async def test_one_customers_failure_stops_the_other_queries_of_a_reconcile(
    ledger: AsyncMetering, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ledger.ingest_usage_events([event(n, customer=f"c{n:03d}") for n in range(60)])
    await ledger.flush_mirrors(timeout=30)
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    capabilities = (await mirror.load_capabilities()).model_copy(update={"requires_customer": True})
    asking, asked, finished = mirror.fetch_usage, [0], [False]

    async def one_at_a_time() -> Any:
        return capabilities

    async def answering(query: UsageQuery) -> Any:
        asked[0] += finished[0]
        if query.customer_id == "c000":
            raise RuntimeError("this one fails")
        await asyncio.sleep(0.01)
        return await asking(query)

    monkeypatch.setattr(mirror, "load_capabilities", one_at_a_time)
    monkeypatch.setattr(mirror, "fetch_usage", answering)
    with pytest.raises(RuntimeError, match="this one fails"):
        await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))
    finished[0] = True
    await asyncio.sleep(0.3)

    assert asked[0] == 0  # none asked after reconcile gave up


async def test_the_outbox_on_postgresql_keeps_room_for_its_claims(postgres_url: str) -> None:
    """The outbox's pages keep room (fillfactor 50, migration 0006), so a forwarder's
    claim updates its rows on their page (HOT, no index entries): half its cost."""
    import asyncpg

    provider = SqlProvider(
        SqlSettings(url=postgres_url, mirrors={"billing": {"provider": "memory"}})
    )
    await provider.create_meter(MeterCreate(event_name="calls"))  # the schema made by migrations
    await provider.aclose()
    connection = await asyncpg.connect(postgres_url)
    try:
        options = await connection.fetchval(
            "SELECT reloptions FROM pg_class WHERE relname = 'outbox'"
        )
    finally:
        await connection.close()
    assert options == ["fillfactor=50"]


async def test_a_pass_finds_the_refused_meters_through_the_dead_letters_index(
    sqlite_url: str,
) -> None:
    """Every pass asks which meters the mirror refused; through the dead letters' index
    (migration 0007) that reads those few rows, where a scan read the whole outbox
    (11-17 ms a pass with 100,000 rows owed on PostgreSQL)."""
    import sqlite3

    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors={"billing": {"provider": "memory"}}))
    await provider.create_meter(MeterCreate(event_name="calls"))  # the schema made by migrations
    await provider.aclose()
    query = mirrors.REFUSED_METERS.params(mirror="billing").compile(
        dialect=sa.create_engine("sqlite://").dialect, compile_kwargs={"literal_binds": True}
    )
    connection = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        plan = " ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {query}"))
    finally:
        connection.close()
    assert "outbox USING INDEX outbox_dead" in plan, plan


class Slow:
    """A memory mirror that stores a delivery 0.3 s after it is sent, and answers a cancel
    0.5 s after doing it, and refuses (for good) to cancel the ids in `refusing`."""

    def __init__(self, inner: Any, refusing: Sequence[str] = ()) -> None:
        self.inner, self.refusing = inner, set(refusing)

    async def ingest_usage_events(self, sent: Sequence[UsageEvent]) -> IngestResult:
        await asyncio.sleep(0.3)
        result: IngestResult = await self.inner.ingest_usage_events(sent)
        return result

    async def cancel_usage_events(
        self, ids: Sequence[str], *, event_name: str | None = None
    ) -> Any:
        if self.refusing & set(ids):
            raise ValidationError(f"{sorted(self.refusing & set(ids))} may not be cancelled here")
        result = await self.inner.cancel_usage_events(ids, event_name=event_name)
        await asyncio.sleep(0.5)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def mirrored_total(provider: SqlProvider, mirror: str) -> Decimal:
    inner = provider.forwarder.mirrors[mirror]
    [meter] = (await inner.fetch_all_meters()).items
    query = UsageQuery(meter_id=meter.id, start=AT, end=AT + timedelta(days=1))
    return (await inner.fetch_usage(query)).total


async def test_a_cancel_answered_not_found_while_its_event_is_in_flight_waits(
    sqlite_url: str,
) -> None:
    """One pass is delivering e5 when another cancels it: the mirror does not know e5 yet
    and says so, then e5 lands. The cancel is not done (the mirror would bill e5): it
    waits, and the next pass cancels e5 there."""
    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors={"billing": {"provider": "memory"}}))
    meter = await provider.create_meter(MeterCreate(event_name="calls"))
    await provider.flush_mirrors(timeout=30)
    inner = provider.forwarder.mirrors["billing"]
    provider.forwarder.mirrors["billing"] = Slow(inner)
    await provider.ingest_usage_events([event(n) for n in range(10)])
    delivering = asyncio.create_task(provider.forwarder.forward("billing"))
    await asyncio.sleep(0.1)
    await provider.cancel_usage_events(["e5"])
    await provider.forwarder.forward("billing")  # the mirror answers not found; e5 lands
    await delivering
    [status] = await provider.flush_mirrors(timeout=30)

    query = UsageQuery(meter_id=meter.id, start=AT, end=AT + timedelta(days=1))
    ledger = (await provider.fetch_usage(query)).total
    provider.forwarder.mirrors["billing"] = inner
    live = sum(event(n).value for n in range(10) if n != 5)
    assert (status.depth, ledger, await mirrored_total(provider, "billing")) == (0, live, live)
    await provider.aclose()


async def test_a_cancel_the_mirror_refuses_is_a_dead_letter_and_the_rest_go_on(
    sqlite_url: str,
) -> None:
    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors={"billing": {"provider": "memory"}}))
    await provider.create_meter(MeterCreate(event_name="calls"))
    await provider.ingest_usage_events([event(n) for n in range(6)])
    await provider.flush_mirrors(timeout=30)
    inner = provider.forwarder.mirrors["billing"]
    provider.forwarder.mirrors["billing"] = Slow(inner, refusing=["e2"])
    await provider.cancel_usage_events([f"e{n}" for n in range(6)])

    await provider.forwarder.forward("billing")

    [status] = await provider.forwarder.status()
    assert (status.depth, status.dead_letters) == (0, 1)
    provider.forwarder.mirrors["billing"] = inner
    assert await mirrored_total(provider, "billing") == event(2).value  # only e2 still counts
    await provider.aclose()


async def test_a_store_failure_in_one_pass_leaves_no_rows_leased(sqlite_url: str) -> None:
    """One mirror's pass fails on the store mid-pass while another mirror's is sending:
    the sender finishes and settles (cancelled mid-send, it had left what the mirror took
    leased for the lease's two minutes), the failed pass gives its rows back at once, and
    the failure is raised."""
    two = {"a": {"provider": "memory"}, "b": {"provider": "memory"}}
    provider = SqlProvider(SqlSettings(url=sqlite_url, mirrors=two))
    await provider.create_meter(MeterCreate(event_name="calls"))
    await provider.flush_mirrors(timeout=30)
    forwarder = provider.forwarder
    forwarder.mirrors["b"] = Wrapped(forwarder.mirrors["b"], delay=0.3)
    await provider.ingest_usage_events([event(n) for n in range(200)])
    real = forwarder._refused_meters
    failures = [OSError("database is locked (once)")]

    async def refused_meters(mirror: str) -> dict[str, str]:
        if mirror == "a" and failures:
            await asyncio.sleep(0.1)
            raise failures.pop()
        return await real(mirror)

    forwarder._refused_meters = refused_meters  # type: ignore[method-assign]
    with pytest.raises(OSError, match="once"):
        await provider.flush_mirrors(timeout=30)
    assert {s.mirror: s.depth for s in await forwarder.status()}["b"] == 0
    statuses = await provider.flush_mirrors(timeout=10)  # the lease is 120 s
    assert [s.depth for s in statuses] == [0, 0]
    await provider.aclose()


async def test_a_running_forwarder_rests_while_the_store_is_down() -> None:
    """Each pass that fails rests its idle time: four passes, 1.1 s at 0.25 s each, ask
    the store 4 x 5 times at most (not in a loop, woken by one another), and say so once."""
    forwarder = mirrors.Forwarder(lambda *a, **k: None, {"billing": object()})  # type: ignore[arg-type]
    asked = 0

    async def forward(mirror: str, *, limit: int | None = None) -> int:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0.005)
        raise OSError("the store is down")

    forwarder.forward = forward  # type: ignore[method-assign]
    running = asyncio.create_task(forwarder.run(idle=0.25))
    await asyncio.sleep(1.1)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert mirrors.PASSES <= asked <= mirrors.PASSES * 5


async def lose(ledger: AsyncMetering, event_ids: list[str]) -> None:
    """The mirror loses these events (cancelled there, behind the ledger's back)."""
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    await provider.forwarder.mirrors["billing"].cancel_usage_events(event_ids)


async def test_a_deleted_meters_events_never_reach_the_meter_made_again_with_its_name(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """The ledger counts them nowhere; sent, the mirror's meter of that name, made again
    too, would bill them: a dead letter retried as reconcile advises, or events still
    owed when the meter went (probe)."""
    _, behind = mirror_service
    seats = await ledger.create_meter(event_name="seats")
    await ledger.flush_mirrors(timeout=30)
    [theirs] = [m for m in (await behind.fetch_all_meters()).items if m.event_name == "seats"]
    await behind.delete_meter(theirs.id)  # so the mirror refuses e2: a dead letter
    await ledger.ingest_usage_events([event(2, name="seats")])
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.dead_letters == 1
    await behind.create_meter(event_name="seats")
    await ledger.ingest_usage_events([event(4, name="seats")])
    await ledger.flush()  # stored, owed, not yet sent

    await ledger.delete_meter(seats.id)
    again = await ledger.create_meter(event_name="seats")
    await ledger.ingest_usage_events([event(7, name="seats")])
    assert await ledger.retry_mirror_dead_letters("billing") == 1
    [status] = await ledger.flush_mirrors(timeout=30)

    assert (status.depth, status.dead_letters) == (0, 0)
    assert status.withheld == 2  # e2 and e4, settled unsent: not counted as delivered
    [theirs] = [m for m in (await behind.fetch_all_meters()).items if m.event_name == "seats"]
    span = {"start": AT, "end": AT + timedelta(days=1)}
    assert (await behind.fetch_usage(theirs.id, **span)).total == event(7).value
    report = await ledger.reconcile("billing", **span, meter_ids=[again.id])
    assert [(c.ledger, c.mirror, c.status) for c in report.cells] == [
        (event(7).value, event(7).value, CellStatus.equal)
    ]


async def test_a_cell_of_a_meter_made_again_is_not_refused_for_the_deleted_meters_events(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Reconcile reads what is owed and refused by the meter, not its event name: the
    deleted meter's dead letter read the new meter's short cell `refused`, and it was
    not repaired (probe)."""
    _, behind = mirror_service
    seats = await ledger.create_meter(event_name="seats")
    await ledger.flush_mirrors(timeout=30)
    [theirs] = [m for m in (await behind.fetch_all_meters()).items if m.event_name == "seats"]
    await behind.delete_meter(theirs.id)
    await ledger.ingest_usage_events([event(2, name="seats")])
    [status] = await ledger.flush_mirrors(timeout=30)
    assert status.dead_letters == 1  # e2
    await behind.create_meter(event_name="seats")
    await ledger.delete_meter(seats.id)
    again = await ledger.create_meter(event_name="seats")
    await ledger.ingest_usage_events([event(7, name="seats")])
    await ledger.flush_mirrors(timeout=30)
    await lose(ledger, ["e7"])  # the mirror loses the new meter's event
    span = {"start": AT, "end": AT + timedelta(days=1)}

    [cell] = (await ledger.reconcile("billing", **span, meter_ids=[again.id], repair=True)).cells

    assert (cell.status, cell.repaired) == (CellStatus.short, True)
    [cell] = (await ledger.reconcile("billing", **span, meter_ids=[again.id])).cells
    assert (cell.status, cell.mirror) == (CellStatus.equal, event(7).value)


async def test_a_cancellation_owed_as_the_repair_is_recorded_holds_the_repair_back(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Cancelled after reconcile read the totals twice (here: while the mirror is asked
    about another meter), the cell's total no longer holds: repaired, the correction
    would carry the cancelled event, whose cancellation then finds nothing to cancel on
    the mirror, which stays over (probe)."""
    _, behind = mirror_service
    await ledger.create_meter(event_name="zzz")  # asked after calls
    await ledger.ingest_usage_events([event(1), event(2), event(3), event(9, name="zzz")])
    await ledger.flush_mirrors(timeout=30)
    await lose(ledger, ["e2"])  # the mirror lost e2
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    mirror = provider.forwarder.mirrors["billing"]
    asking = mirror.fetch_usage
    zzz = next(m for m in (await behind.fetch_all_meters()).items if m.event_name == "zzz")

    async def meanwhile(query: UsageQuery) -> Any:
        if query.meter_id == zzz.id and not cancelled:
            cancelled.append(await provider.cancel_usage_events(["e2"]))
        return await asking(query)

    cancelled: list[Any] = []
    mirror.fetch_usage = meanwhile  # type: ignore[method-assign]
    span = {"start": AT, "end": AT + timedelta(days=1)}
    report = await ledger.reconcile("billing", **span, repair=True)
    mirror.fetch_usage = asking  # type: ignore[method-assign]

    assert cancelled
    [cell] = [c for c in report.cells if c.event_name == "calls"]
    assert (cell.status, cell.repaired) == (CellStatus.short, False)
    await ledger.flush_mirrors(timeout=30)
    [cell] = [
        c for c in (await ledger.reconcile("billing", **span)).cells if c.event_name == "calls"
    ]
    assert (cell.status, cell.ledger, cell.mirror) == (
        CellStatus.equal,
        event(1).value + event(3).value,
        event(1).value + event(3).value,
    )


async def test_a_meter_still_owed_to_the_mirror_has_its_cells_pending(
    ledger_url: str, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """Not `not_comparable`: the mirror has none of its usage yet, and will (probe: a key
    without `meters:write` held the meter back, and the cells read not comparable)."""
    url, behind = mirror_service
    async with AsyncMetering(
        "sql", url=ledger_url, mirrors=billing(url), linger=0, mirror_forwarder=False
    ) as metering:
        await metering.create_meter(event_name="calls")
        await metering.ingest_usage_events([event(1), event(2, customer="beta")])
        span = {"start": AT, "end": AT + timedelta(days=1)}

        report = await metering.reconcile("billing", **span)

        assert {(c.customer_id, c.status) for c in report.cells} == {
            ("acme", CellStatus.pending),
            ("beta", CellStatus.pending),
        }
        await metering.flush_mirrors(timeout=30)
        report = await metering.reconcile("billing", **span)
        assert {c.status for c in report.cells} == {CellStatus.equal}
        assert await totals(behind) == await totals(metering)


async def test_a_shortfall_larger_than_one_event_can_carry_is_repaired_in_parts(
    ledger: AsyncMetering,
) -> None:
    """An event holds at most 20 digits before the point; a cell's shortfall may have
    more. One correction failed validation, and the whole repair with it (probe)."""
    await ledger.create_meter(event_name="bytes")
    # 38 digits each; the parts' last has more than a default decimal context keeps
    values = ["99999999999999999999.123456789012345678", "50000000000000000000.5", "1"]
    lost = [
        UsageEvent(id=f"b{n}", event_name="bytes", customer_id="acme", value=v, timestamp=AT)
        for n, v in enumerate(values)
    ]
    await ledger.ingest_usage_events([*lost, event(1), event(2)])
    await ledger.flush_mirrors(timeout=30)
    await lose(ledger, ["b0", "b1", "b2", "e2"])
    span = {"start": AT, "end": AT + timedelta(days=1)}

    report = await ledger.reconcile("billing", **span, repair=True)

    assert {(c.event_name, c.repaired) for c in report.cells} == {("bytes", True), ("calls", True)}
    after = await ledger.reconcile("billing", **span)
    assert after.ok
    [cell] = [c for c in after.cells if c.event_name == "bytes"]
    assert cell.mirror == cell.ledger == Decimal("150000000000000000000.623456789012345678")


async def test_a_deleted_meters_events_still_owed_reach_the_mirrors_meter_it_found(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """A meter the ledger found on the mirror outlives the ledger's (other writers use
    it): the events stored while the ledger's lived are its, however far the forwarder
    lagged (review: dropped, the mirror billed 7 of 18)."""
    _, behind = mirror_service
    theirs = await behind.create_meter(event_name="found")
    ours = await ledger.create_meter(event_name="found")
    await ledger.ingest_usage_events([event(1, name="found"), event(2, name="found")])
    await ledger.flush_mirrors(timeout=30)
    await ledger.ingest_usage_events([event(3, name="found"), event(4, name="found")])
    await ledger.flush()  # stored, and owed

    await ledger.delete_meter(ours.id)
    [status] = await ledger.flush_mirrors(timeout=30)

    assert (status.depth, status.dead_letters) == (0, 0)
    [kept] = [m for m in (await behind.fetch_all_meters()).items if m.event_name == "found"]
    assert kept.id == theirs.id
    usage = await behind.fetch_usage(theirs.id, start=AT, end=AT + timedelta(days=1))
    assert usage.total == sum(event(n).value for n in range(1, 5))


async def test_a_linked_meter_gone_from_the_mirror_is_short_while_an_update_is_owed(
    ledger: AsyncMetering, mirror_service: tuple[str, AsyncMetering]
) -> None:
    """`pending` is for a meter on its way: one linked before, whose mirror meter went
    behind the ledger's back, is not, whatever change of it is owed (review); the
    mirror bills nothing of it."""
    _, behind = mirror_service
    await ledger.ingest_usage_events([event(1)])
    await ledger.flush_mirrors(timeout=30)
    [theirs] = (await behind.fetch_all_meters()).items
    await behind.delete_meter(theirs.id)
    [ours] = (await ledger.fetch_all_meters()).items
    await ledger.update_meter(ours.id, display_name="Calls, renamed")  # owed, not sent

    report = await ledger.reconcile("billing", start=AT, end=AT + timedelta(days=1))

    assert [c.status for c in report.cells] == [CellStatus.short]


def a_meter(aggregation: str = "sum") -> Meter:
    return Meter(
        id="mtr_1",
        event_name="calls",
        display_name="calls",
        aggregation=aggregation,
        dimensions=[],
        status="active",
        created_at=AT,
        updated_at=AT,
    )


def a_short_cell(ledger: Decimal, mirror: Decimal, customer: str = "acme") -> ReconcileCell:
    return ReconcileCell(
        meter_id="mtr_1",
        event_name="calls",
        customer_id=customer,
        start=AT,
        end=AT + timedelta(days=1),
        ledger=ledger,
        mirror=mirror,
        status=CellStatus.short,
    )


def test_a_shortfall_with_more_places_than_an_event_carries_is_sent_to_its_places() -> None:
    """A float-summing mirror's total, read to 15 significant digits, may have 24 places;
    the cell was logged and left short (review)."""
    cell = a_short_cell(Decimal(1), Decimal("1.23456789012345E-10"))
    [correction] = reconcile_module._corrections(a_meter(), cell, AT, newest=1)
    assert correction.value == Decimal("0.999999999876543211")


def test_a_repairs_ids_are_the_same_for_the_same_drift_of_a_cell_and_new_for_another() -> None:
    """A repair interrupted and run again sends the ids it sent, which the mirror answers
    duplicate: new ones would bill the shortfall twice. (Their form is kept too: a repair
    recorded by a version before sends the same ids from this one.)"""
    cell = a_short_cell(Decimal(10), Decimal(7))

    def ids(meter: Meter, cell: ReconcileCell, newest: int = 7) -> list[str]:
        return [e.id for e in reconcile_module._corrections(meter, cell, AT, newest)]

    [one] = ids(a_meter(), cell)
    assert ids(a_meter(), cell) == [one]
    assert re.fullmatch(r"reconcile-[0-9a-f]{40}", one)
    others = [
        ids(a_meter(), a_short_cell(Decimal(10), Decimal(7), customer="beta")),
        ids(a_meter(), a_short_cell(Decimal(11), Decimal(7))),
        ids(a_meter(), a_short_cell(Decimal(10), Decimal(6))),
        ids(a_meter(), cell, newest=8),
    ]
    assert len({one, *(i for found in others for i in found)}) == 5
    counted = ids(a_meter("count"), cell)
    assert [i.rsplit("-", 1)[1] for i in counted] == ["0", "1", "2"]
    assert len({i.rsplit("-", 1)[0] for i in counted}) == 1
    parts = ids(a_meter(), a_short_cell(Decimal(3) * 10**20, Decimal(0)))
    assert [i.rsplit("-", 1)[1] for i in parts] == ["part0", "part1", "part2", "part3"]
    whole = reconcile_module.LARGEST_CORRECTION * 2  # no part of nothing after them
    parts = ids(a_meter(), a_short_cell(whole, Decimal(0)))
    assert [i.rsplit("-", 1)[1] for i in parts] == ["part0", "part1"]
