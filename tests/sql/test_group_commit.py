"""Group commit on the sql store: concurrent callers share transactions, and each is
answered for exactly its own events, on SQLite and PostgreSQL, with failures injected
into shared transactions; and the copy of the meters a PostgreSQL write is judged by
never outlives another process's change to them."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from metering_core.errors import ProviderUnavailableError
from metering_core.models import EventQuery, IngestResult, MeterCreate, UsageEvent, UsageQuery
from metering_core.sql import SqlSettings
from metering_core.sql import provider as sql_provider
from metering_core.sql.group_commit import GroupCommit, Ingest
from metering_core.sql.ingest import EventMeter
from metering_core.sql.judged import Judged
from metering_core.sql.provider import SqlProvider

AT = datetime(2026, 11, 2, 10, tzinfo=UTC)
CALLERS = 16
REQUESTS = 8
PER_REQUEST = 5


@pytest.fixture(params=["sqlite_url", "postgres_url"])
def store_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(request.param)
    return url


@pytest.fixture
async def provider(store_url: str) -> AsyncIterator[SqlProvider]:
    provider = SqlProvider(SqlSettings(url=store_url))
    await provider.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
    yield provider
    await provider.aclose()


def value_of(event_id: str) -> Decimal:
    """Each id has one value, whichever caller sends it."""
    return Decimal(int(event_id.removeprefix("e")) % 7 + 1)


def request_of(ids: list[str]) -> list[UsageEvent]:
    return [
        UsageEvent(id=i, event_name="calls", customer_id="acme", value=value_of(i), timestamp=AT)
        for i in ids
    ]


WriteCall = Callable[..., Awaitable[Any]]


def fail_some_writes(
    monkeypatch: pytest.MonkeyPatch, failure: Callable[[list[str]], BaseException | None]
) -> list[int]:
    """Make each write of events (in a transaction, or PostgreSQL's one statement) raise
    `failure(ids)` after the statement ran, when it gives one; the sizes of all writes."""
    sizes: list[int] = []

    def failing(real: WriteCall) -> WriteCall:
        async def write(connection: Any, rows: Any, *args: Any, **kwargs: Any) -> Any:
            done = await real(connection, rows, *args, **kwargs)
            sizes.append(len(rows))
            exc = failure([event.id for event, _ in rows])
            if exc is not None:
                raise exc
            return done

        return write

    for name in ("insert_events", "insert_events_checked"):
        monkeypatch.setattr(sql_provider, name, failing(getattr(sql_provider, name)))
    return sizes


async def send_until_answered(provider: SqlProvider, events: list[UsageEvent]) -> IngestResult:
    """A caller that retries its request until it is answered, as every client does."""
    for _ in range(50):
        try:
            return await provider.ingest_usage_events(events)
        except (ProviderUnavailableError, RuntimeError):
            await asyncio.sleep(0)
    raise AssertionError("a request never got an answer")


@pytest.mark.parametrize(
    "injected",
    [
        ProviderUnavailableError("the store went away", provider="sql"),
        RuntimeError("a write failed"),
    ],
    ids=["outage", "other-failure"],
)
async def test_concurrent_callers_with_overlapping_ids_each_count_once(
    provider: SqlProvider, monkeypatch: pytest.MonkeyPatch, injected: BaseException
) -> None:
    writes = itertools.count()
    sizes = fail_some_writes(monkeypatch, lambda ids: injected if next(writes) % 4 == 1 else None)
    pool = [f"e{n}" for n in range(120)]  # 640 ids sent from a pool of 120: most overlap
    requests = [
        [random.Random(caller * 100 + n).sample(pool, PER_REQUEST) for n in range(REQUESTS)]
        for caller in range(CALLERS)
    ]

    async def caller(mine: list[list[str]]) -> list[IngestResult]:
        return [await send_until_answered(provider, request_of(ids)) for ids in mine]

    answers = await asyncio.gather(*(caller(mine) for mine in requests))

    assert max(sizes) > PER_REQUEST, "no transaction was shared: nothing here tested grouping"
    accepted: Counter[str] = Counter()
    for mine, theirs in zip(requests, answers, strict=True):
        for ids, answer in zip(mine, theirs, strict=True):
            assert not answer.rejected
            assert sorted(answer.accepted + answer.duplicates) == sorted(ids)
            accepted.update(answer.accepted)
    assert max(accepted.values()) == 1, "an event was accepted twice"
    sent = {i for mine in requests for ids in mine for i in ids}
    # A write that failed after its statement committed (PostgreSQL's one statement) has
    # stored its events; their retries were duplicates. Otherwise each was accepted once.
    assert set(accepted) <= sent
    usage = await provider.fetch_usage(
        UsageQuery(meter_id=await meter_id(provider), start=AT, end=AT + timedelta(hours=1))
    )
    assert usage.total == sum(value_of(i) for i in sent)
    stored = await provider.list_usage_events(
        EventQuery(event_name="calls", start=AT, end=AT + timedelta(hours=1), limit=1000)
    )
    assert sorted(e.id for e in stored.items) == sorted(sent)


async def test_the_callers_of_one_group_are_answered_as_one_after_another() -> None:
    """A group's answers are those its callers would have had in turn, though their rows
    go in together: the first sends an id under an event name without a meter (rejected),
    the second the same id under a meter (stored: accepted), the third it again (a
    duplicate)."""
    loop = asyncio.get_running_loop()
    meters = {"calls": EventMeter(1, "calls", "m1", None, "sum")}

    def sending(event_name: str) -> Ingest:
        event = UsageEvent(id="x", event_name=event_name, customer_id="acme", value=1, timestamp=AT)
        return Ingest([event], False, loop.create_future())

    judged = Judged.of([sending("unmetered"), sending("calls"), sending("calls")], meters)
    assert [event.id for event, _ in judged.rows] == ["x", "x"]
    assert judged.refused_ids == {"x"}
    first, second, third = judged.answers(inserted={"x"}, known={"x"})
    assert first.rejected == {"x": "no meter for event_name='unmetered'"}
    assert (first.accepted, second.accepted, third.accepted) == ([], ["x"], [])
    assert (second.duplicates, third.duplicates) == ([], ["x"])


async def meter_id(provider: SqlProvider) -> str:
    return (await provider.fetch_all_meters()).items[0].id


async def test_a_failure_of_one_callers_events_fails_no_other_caller(
    provider: SqlProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_some_writes(
        monkeypatch,
        lambda ids: RuntimeError("poisoned") if any(i.startswith("p") for i in ids) else None,
    )
    healthy = [[f"e{c * 10 + n}" for n in range(3)] for c in range(10)]

    async def poisoned() -> IngestResult:
        events = request_of(["e999"])
        return await provider.ingest_usage_events(
            [events[0].model_copy(update={"id": "p1"}), *events]
        )

    outcomes = await asyncio.gather(
        poisoned(),
        *(provider.ingest_usage_events(request_of(ids)) for ids in healthy),
        return_exceptions=True,
    )

    assert isinstance(outcomes[0], RuntimeError)
    for ids, answer in zip(healthy, outcomes[1:], strict=True):
        assert isinstance(answer, IngestResult), answer
        assert sorted(answer.accepted) == sorted(ids)
    stored = await provider.list_usage_events(
        EventQuery(event_name="calls", start=AT, end=AT + timedelta(hours=1), limit=1000)
    )
    assert {e.id for e in stored.items} == {i for ids in healthy for i in ids}


async def test_an_outage_fails_each_caller_of_the_transaction_and_stores_nothing(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = SqlProvider(SqlSettings(url=sqlite_url))
    await provider.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
    fail_some_writes(monkeypatch, lambda ids: ProviderUnavailableError("down", provider="sql"))
    outcomes = await asyncio.gather(
        *(provider.ingest_usage_events(request_of([f"e{n}"])) for n in range(8)),
        return_exceptions=True,
    )
    assert all(isinstance(o, ProviderUnavailableError) for o in outcomes), outcomes
    monkeypatch.undo()
    stored = await provider.list_usage_events(
        EventQuery(event_name="calls", start=AT, end=AT + timedelta(hours=1))
    )
    assert stored.items == []  # rolled back: a caller's retry is its first write
    await provider.aclose()


async def test_another_process_changing_the_meters_is_seen_by_the_next_write(
    postgres_url: str,
) -> None:
    here = SqlProvider(SqlSettings(url=postgres_url))
    there = SqlProvider(SqlSettings(url=postgres_url))
    try:
        meter = await here.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
        first = await here.ingest_usage_events(request_of(["e1"]))
        assert first.accepted == ["e1"]  # `here` now holds a copy of the meter
        refused = await here.ingest_usage_events(
            [request_of(["e2"])[0].model_copy(update={"event_name": "seats"})]
        )
        assert list(refused.rejected) == ["e2"]  # and knows "seats" has no meter

        await there.delete_meter(meter.id)
        latest = await there.create_meter(MeterCreate(event_name="calls", aggregation="latest"))
        seats = await there.create_meter(MeterCreate(event_name="seats", aggregation="sum"))

        raising_only = await here.ingest_usage_events(request_of(["e3"]), lowering_refused=True)
        assert list(raising_only.rejected) == ["e3"], "judged by the deleted sum meter"
        await here.ingest_usage_events(request_of(["e4"]))
        to_seats = await here.ingest_usage_events(
            [request_of(["e5"])[0].model_copy(update={"event_name": "seats"})]
        )
        assert to_seats.accepted == ["e5"], "judged by a copy that had no meter for seats"
        end = AT + timedelta(hours=1)
        usage = await there.fetch_usage(UsageQuery(meter_id=latest.id, start=AT, end=end))
        assert usage.total == value_of("e4")
        seated = await there.fetch_usage(UsageQuery(meter_id=seats.id, start=AT, end=end))
        assert seated.total == value_of("e5")
    finally:
        await here.aclose()
        await there.aclose()


@pytest.mark.filterwarnings("ignore")
def test_a_loop_closed_with_writes_queued_leaves_the_next_loop_its_own_writes() -> None:
    """A loop closed with callers queued and a write in flight (its tasks never
    cancelled), then the same group commit used from a new loop: the new loop's caller is
    answered, not left behind the closed loop's queue or its lane. (The write is a stand-in:
    a real store's abandoned transaction is the store's to time out.)"""
    stuck = asyncio.Event()

    async def write(group: Sequence[Ingest]) -> list[IngestResult]:
        if any(event.id in ("e0", "e1") for ingest in group for event in ingest.events):
            await stuck.wait()  # loop 1's write never finishes
        return [IngestResult(accepted=[e.id for e in ingest.events]) for ingest in group]

    commits = GroupCommit(write, lanes=1, max_events=5)
    first = asyncio.new_event_loop()
    # the first in flight, the next queued behind it (a group holds at most 5 events)
    left = [
        first.create_task(commits.ingest(request_of([f"e{k}"] * 5), lowering_refused=False))
        for k in range(2)
    ]
    first.run_until_complete(asyncio.sleep(0.01))
    first.close()
    assert not any(task.done() for task in left)

    async def later() -> IngestResult:
        return await asyncio.wait_for(commits.ingest(request_of(["e7"]), lowering_refused=False), 5)

    assert asyncio.run(later()).accepted == ["e7"]


@pytest.mark.parametrize("noticed", [False, True], ids=["found-by-the-write", "noticed-idle"])
async def test_writes_after_the_server_dropped_every_connection_are_answered(
    postgres_url: str, noticed: bool
) -> None:
    """Connections are not pinged on checkout: a server restart (here, every connection of
    the database terminated) is found by the next write, which is written again on a new
    connection instead of failing its callers; connections the driver has already seen
    closed (`noticed`: the server's close read while they sat in the pool) are passed
    over, however many the pool holds."""
    import asyncpg

    provider = SqlProvider(SqlSettings(url=postgres_url))
    try:
        await provider.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
        await provider.ingest_usage_events(request_of(["e0"]))
        holder = await asyncpg.connect(postgres_url)
        try:  # writes held up by a lock: each lane on a connection of its own
            holding = holder.transaction()
            await holding.start()
            await holder.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            writes = []
            for n in range(1, 8):  # one by one: each lane takes one and waits on the lock
                writes.append(
                    asyncio.create_task(provider.ingest_usage_events(request_of([f"e{n}"])))
                )
                await asyncio.sleep(0.05)
            await holding.rollback()
            await asyncio.gather(*writes)
        finally:
            await holder.close()
        server, database = postgres_url.rsplit("/", 1)
        admin = await asyncpg.connect(f"{server}/postgres")
        try:
            dropped = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        finally:
            await admin.close()
        assert dropped >= 2  # a connection per lane
        if noticed:
            await asyncio.sleep(0.5)
        answers = [await provider.ingest_usage_events(request_of([f"e{n}"])) for n in range(8, 12)]
        assert [a.accepted for a in answers] == [[f"e{n}"] for n in range(8, 12)]
    finally:
        await provider.aclose()


async def test_a_write_whose_connection_dies_under_it_is_written_again_once(
    postgres_url: str,
) -> None:
    """The server ends the connection while its write waits (here, on a lock another
    session holds): nothing of it committed, so it is written again on a new
    connection, and the caller is answered as if nothing had happened, its event
    counted once."""
    async with events_locked(postgres_url) as (provider, admin, database, release):
        write = asyncio.create_task(provider.ingest_usage_events(request_of(["e2"])))
        [waiting] = await waiting_on_locks(admin, database, 1)
        await admin.execute("SELECT pg_terminate_backend($1)", waiting)
        await asyncio.sleep(0.2)
        await release()
        answer = await asyncio.wait_for(write, 10)
        assert answer.accepted == ["e2"]
        usage = await provider.fetch_usage(
            UsageQuery(
                meter_id=(await provider.fetch_all_meters()).items[0].id,
                start=AT - timedelta(hours=1),
                end=AT + timedelta(hours=1),
            )
        )
        assert sum(row.value for row in usage.rows) == value_of("e1") + value_of("e2")


async def test_a_write_the_server_refuses_a_connection_for_fails_as_the_store_unavailable(
    postgres_url: str,
) -> None:
    """A new connection refused (a server starting up or shutting down, too many clients,
    here the database closed to connections) is the store unavailable, retryable, as on
    every other path: not the driver's own error, which the service answered with a 500.
    Once the server takes connections again, so do writes."""
    import asyncpg

    provider = SqlProvider(SqlSettings(url=postgres_url))
    server, database = postgres_url.rsplit("/", 1)
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await provider.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
        await provider.ingest_usage_events(request_of(["e1"]))
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            database,
        )
        await asyncio.sleep(0.3)  # the pool's connections seen closed: a new one is needed
        with pytest.raises(ProviderUnavailableError, match="not currently accepting"):
            await provider.ingest_usage_events(request_of(["e2"]))
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        assert (await provider.ingest_usage_events(request_of(["e2"]))).accepted == ["e2"]
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
        await provider.aclose()


async def test_a_new_connection_lost_under_its_write_fails_it_rather_than_write_again(
    postgres_url: str,
) -> None:
    """Only a connection that had sat in the pool can have gone stale there: one opened
    for this write and lost under it is the server failing the write (a statement that
    crashes it would crash it again), so the write fails, retryable by its caller, and is
    not sent again here. A write on a pooled connection is answered as usual."""
    async with events_locked(postgres_url) as (provider, admin, database, release):
        pooled = asyncio.create_task(provider.ingest_usage_events(request_of(["e2"])))
        await waiting_on_locks(admin, database, 1)
        new = asyncio.create_task(provider.ingest_usage_events(request_of(["e3"])))
        newest = (await waiting_on_locks(admin, database, 2))[-1]
        await admin.execute("SELECT pg_terminate_backend($1)", newest)
        with pytest.raises(ProviderUnavailableError):
            await asyncio.wait_for(new, 10)
        await release()
        assert (await asyncio.wait_for(pooled, 10)).accepted == ["e2"]


@asynccontextmanager
async def events_locked(
    postgres_url: str,
) -> AsyncIterator[tuple[SqlProvider, Any, str, Callable[[], Awaitable[None]]]]:
    """A provider with a meter and one write done (one connection pooled, the meters'
    copy kept), an admin connection, the database's name, and the events table locked by
    another session until `release()`: writes then wait on the lock, each on a backend
    a test can end."""
    import asyncpg

    provider = SqlProvider(SqlSettings(url=postgres_url))
    server, database = postgres_url.rsplit("/", 1)
    holder = await asyncpg.connect(postgres_url)
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await provider.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
        await provider.ingest_usage_events(request_of(["e1"]))
        holding = holder.transaction()
        await holding.start()
        await holder.execute("LOCK TABLE events IN EXCLUSIVE MODE")
        yield provider, admin, database, holding.rollback
    finally:
        await holder.close()
        await admin.close()
        await provider.aclose()


async def waiting_on_locks(admin: Any, database: str, count: int) -> list[int]:
    """The backends of `database` waiting on a lock, oldest first, once there are `count`."""
    for _ in range(500):
        pids = [
            row["pid"]
            for row in await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                "AND wait_event_type = 'Lock' ORDER BY backend_start",
                database,
            )
        ]
        if len(pids) >= count:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} backends never waited on a lock")


async def test_postgres_plans_the_ingest_statement_once_per_connection(postgres_url: str) -> None:
    """PostgreSQL's plan cache plans a prepared statement for its values five times, then
    keeps a generic plan if that looks no dearer. The ingest statement takes its lists as
    JSON (estimated alike either way) and looks the refused ids up apart, so it does: a
    one-event write took 0.85 ms when planned every time, and 0.4 ms on its cached plan.
    (An array parameter's length is known to a plan for its values only, which made
    every such plan look cheaper than the generic one.)"""
    import sqlalchemy as sa

    provider = SqlProvider(SqlSettings(url=postgres_url))
    try:
        await provider.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
        for n in range(10):  # one at a time, so one connection writes them all
            sent = request_of([f"e{n}"])
            if n % 3 == 0:  # and some with an event for no meter: refused ids looked up
                sent = [*sent, UsageEvent(id=f"x{n}", event_name="nobody", customer_id="t")]
            await provider.ingest_usage_events(sent)
        async with provider._transaction(writes=False) as connection:
            prepared = await connection.execute(
                sa.text("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
            )
            [(generic, custom)] = [
                (generic, custom)
                for statement, generic, custom in prepared
                if "fresh AS" in statement and "pg_prepared_statements" not in statement
            ]
        assert (generic, custom) == (5, 5)
    finally:
        await provider.aclose()


# The coalescing itself, against a writer that holds its first transaction open, so the
# requests that arrive meanwhile queue behind it (mutation testing: no test queued more
# than a group holds, formed a group of two, or stopped a lane).


class HeldWriter:
    """Records each transaction's requests (by their events' ids), keeps the first open
    until `release` is set, counts transactions at once, and fails as `failing` says."""

    def __init__(self, failing: Callable[[list[str]], Exception | None] = lambda ids: None):
        self.groups: list[list[list[str]]] = []
        self.release = asyncio.Event()
        self.at_once = self.most_at_once = 0
        self.failing = failing

    async def __call__(self, group: Sequence[Ingest]) -> list[IngestResult]:
        ids = [[event.id for event in request.events] for request in group]
        self.groups.append(ids)
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            if len(self.groups) == 1:
                await self.release.wait()
            failure = self.failing([i for request in ids for i in request])
            if failure is not None:
                raise failure
            return [IngestResult(accepted=request) for request in ids]
        finally:
            self.at_once -= 1


async def behind_a_held_write(
    commits: GroupCommit, writer: HeldWriter, *requests: list[str]
) -> list[IngestResult | BaseException]:
    """Each caller's outcome: a first request written alone and held open, `requests`
    queued behind it in order, then the first released."""
    asked = [asyncio.create_task(commits.ingest(request_of(["e0"]), lowering_refused=False))]
    await asyncio.sleep(0)
    for ids in requests:
        asked.append(asyncio.create_task(commits.ingest(request_of(ids), lowering_refused=False)))
        await asyncio.sleep(0)
    assert writer.groups == [[["e0"]]]
    writer.release.set()
    return await asyncio.wait_for(asyncio.gather(*asked, return_exceptions=True), 5)


async def test_a_group_takes_waiting_requests_up_to_its_size_and_the_rest_go_next() -> None:
    writer = HeldWriter()
    commits = GroupCommit(writer, lanes=1, max_events=5)
    outcomes = await behind_a_held_write(
        commits, writer, *([f"e{n}"] for n in range(1, 8)), ["e8", "e9", "e10"], ["e11", "e12"]
    )
    assert [sum(map(len, group)) for group in writer.groups] == [1, 5, 5, 2]
    assert [o.accepted for o in outcomes if isinstance(o, IngestResult)] == [
        ["e0"],
        *([f"e{n}"] for n in range(1, 8)),
        ["e8", "e9", "e10"],
        ["e11", "e12"],
    ]  # every caller answered, the one that did not fit too
    assert writer.most_at_once == 1  # one lane: no second transaction while one is open


async def test_a_caller_cancelled_while_it_waits_is_left_out_and_splits_no_group() -> None:
    writer = HeldWriter()
    commits = GroupCommit(writer, lanes=1, max_events=5)
    first = asyncio.create_task(commits.ingest(request_of(["e0"]), lowering_refused=False))
    await asyncio.sleep(0)
    waiting = [
        asyncio.create_task(commits.ingest(request_of([i]), lowering_refused=False))
        for i in ("e1", "e2", "e3")
    ]
    await asyncio.sleep(0)
    waiting[1].cancel()
    writer.release.set()
    await asyncio.wait_for(asyncio.gather(first, waiting[0], waiting[2]), 5)
    assert writer.groups == [[["e0"]], [["e1"], ["e3"]]]


async def test_one_of_two_callers_failing_a_shared_transaction_fails_only_itself() -> None:
    writer = HeldWriter(lambda ids: RuntimeError("e13 is bad") if "e13" in ids else None)
    commits = GroupCommit(writer, lanes=1, max_events=5)
    _, bad, good = await behind_a_held_write(commits, writer, ["e13"], ["e14"])
    assert isinstance(bad, RuntimeError)
    assert isinstance(good, IngestResult)
    assert good.accepted == ["e14"]
    assert writer.groups[1:] == [[["e13"], ["e14"]], [["e13"]], [["e14"]]]


async def test_an_outage_fails_a_group_once_and_a_lone_failure_is_not_written_again() -> None:
    down = ProviderUnavailableError("the store is down", provider="sql")
    writer = HeldWriter(lambda ids: RuntimeError("bad") if ids == ["e0"] else down)
    commits = GroupCommit(writer, lanes=1, max_events=5)
    outcomes = await behind_a_held_write(commits, writer, ["e1"], ["e2"], ["e3"])
    assert isinstance(outcomes[0], RuntimeError)
    assert all(isinstance(o, ProviderUnavailableError) for o in outcomes[1:])
    assert len(writer.groups) == 2  # not once more per caller, at the store that is down


async def test_a_lane_stopped_mid_write_fails_each_caller_with_a_retryable_error() -> None:
    writer = HeldWriter()
    commits = GroupCommit(writer, lanes=1, max_events=5)
    asked = [asyncio.create_task(commits.ingest(request_of(["e0"]), lowering_refused=False))]
    await asyncio.sleep(0)
    asked.append(asyncio.create_task(commits.ingest(request_of(["e1"]), lowering_refused=False)))
    await asyncio.sleep(0)
    [lane] = [task for task in asyncio.all_tasks() if task.get_name() == "metering-group-commit"]
    lane.cancel()  # the loop closing under it
    for outcome in await asyncio.wait_for(asyncio.gather(*asked, return_exceptions=True), 5):
        assert isinstance(outcome, ProviderUnavailableError)
        assert outcome.provider == "sql"
        assert "writer stopped before committing: CancelledError" in str(outcome)


async def test_a_caller_that_may_only_raise_usage_is_refused_a_latest_meter_in_its_group(
    provider: SqlProvider,
) -> None:
    """A tenant's key: an event of a meter its events can lower is refused as it is
    stored, in the group's transaction; another caller's event of it in the same group
    is not (each is judged as its own caller)."""
    await provider.create_meter(MeterCreate(event_name="seats", aggregation="latest"))
    seat = UsageEvent(id="s1", event_name="seats", customer_id="acme", value=0, timestamp=AT)
    operator = seat.model_copy(update={"id": "s2"})
    tenant, anyone = await asyncio.gather(
        provider.ingest_usage_events([seat], lowering_refused=True),
        provider.ingest_usage_events([operator]),
    )
    assert "may only raise usage" in tenant.rejected["s1"]
    assert anyone.accepted == ["s2"]


@pytest.mark.parametrize("checked", [False, True], ids=["in a transaction", "checked"])
async def test_a_group_the_server_rolls_back_in_a_deadlock_is_written_again(
    postgres_url: str, checked: bool
) -> None:
    """A writer that locks ids in another order (a process of another version, mid-
    upgrade) holds e1 and then waits for e0, which the group holds while it waits for
    e1: PostgreSQL rolls the group back (SQLSTATE 40P01). The group is written again
    once the other lets go, and its caller is answered as if nothing had happened.
    `checked`: the meters already known, by the one statement on asyncpg itself (its
    errors unwrapped); else in a transaction through SQLAlchemy (wrapped)."""
    import asyncpg

    provider = SqlProvider(SqlSettings(url=postgres_url))
    other = await asyncpg.connect(postgres_url)
    try:
        meter = await provider.create_meter(MeterCreate(event_name="calls", aggregation="sum"))
        seq = await other.fetchval("SELECT seq FROM meters")
        if checked:
            await provider.ingest_usage_events(request_of(["e7"]))
        insert = (
            "INSERT INTO events (id, meter_seq, event_name, customer_id, ts, value, dimensions) "
            "VALUES ($1, $2, 'calls', 'acme', 0, 1, '{}')"
        )
        holding = other.transaction()
        await holding.start()
        await other.execute(insert, "e1", seq)
        group = asyncio.create_task(provider.ingest_usage_events(request_of(["e0", "e1"])))
        await asyncio.sleep(0.3)  # the group has e0 and waits for e1
        # e0 waits for the group; PostgreSQL finds the cycle and rolls the group back
        await asyncio.wait_for(other.execute(insert, "e0", seq), 10)
        await holding.rollback()
        answer = await asyncio.wait_for(group, 10)
        assert sorted(answer.accepted) == ["e0", "e1"]
        usage = await provider.fetch_usage(
            UsageQuery(meter_id=meter.id, start=AT, end=AT + timedelta(hours=1))
        )
        assert usage.total == value_of("e0") + value_of("e1") + (value_of("e7") if checked else 0)
    finally:
        await other.close()
        await provider.aclose()
