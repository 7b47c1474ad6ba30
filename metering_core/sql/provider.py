"""The sql provider: the ten operations as SQL statements on the store."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import secrets
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from metering_core import rules
from metering_core.config import MeteringSettings, default_store_path
from metering_core.cursors import check_limit, decode_cursor, encode_cursor
from metering_core.epoch import epoch_micros, from_epoch_micros
from metering_core.errors import (
    ConfigurationError,
    ConflictError,
    MeteringError,
    NotFoundError,
    ProviderUnavailableError,
    ValidationError,
)
from metering_core.interface import BaseProvider, IMetering, ReportsRefusals
from metering_core.models import (
    CancelResult,
    Customer,
    CustomerCreate,
    EventQuery,
    IngestResult,
    LinkOutcome,
    Meter,
    MeterCreate,
    MeterUpdate,
    MirrorLink,
    MirrorStatus,
    Page,
    ReconcileReport,
    RefusalNotice,
    StoredEvent,
    Usage,
    UsageEvent,
    UsageQuery,
    Window,
)
from metering_core.sql.checkpoints import Checkpoints
from metering_core.sql.driver import POOLED, Asyncpg
from metering_core.sql.group_commit import GroupCommit, Ingest
from metering_core.sql.ingest import (
    add_to_rollups,
    insert_events,
    insert_events_checked,
    meters_named,
    owe,
    rollup_deltas,
    rollup_key,
)
from metering_core.sql.judged import Judged
from metering_core.sql.listing import event_page, events_statement
from metering_core.sql.meter_copy import MeterCopy
from metering_core.sql.mirror_sync import Refused, mismatch, named, refusal
from metering_core.sql.mirrors import REFUSALS, Forwarder, build_mirrors
from metering_core.sql.reconcile import held_by_repair, one_repair_at_a_time, reconcile
from metering_core.sql.rows import customer_from_row, meter_from_row
from metering_core.sql.schema import (
    ROLLED_UP,
    customers,
    events,
    meters,
    mirror_backfills,
    mirror_notices,
    mirrors,
    outbox,
)
from metering_core.sql.settings import CAPABILITIES, SqlSettings
from metering_core.sql.store import (
    STORE_FAILURES,
    StoreBounds,
    StoreUrl,
    current_revision,
    migrate,
    rolled_back,
    schema_revisions,
    store_error,
)
from metering_core.sql.store_clock import StoreClock, store_now
from metering_core.sql.usage import usage_rows, usage_statement

__all__ = ["SqlProvider"]


_REOPEN = re.compile(r"readonly database|disk I/O error|unable to open", re.IGNORECASE)
"""SQLite failures after which a pooled connection is not to be reused."""

OFF_LOOP_ROWS = 1_000
"""Answers of this many rows or more are typed in a worker thread, off the event loop."""

logger = logging.getLogger("metering")

_OUTBOX_EVER_WRITTEN = {
    "sqlite": "SELECT EXISTS (SELECT 1 FROM outbox) OR EXISTS (SELECT 1 FROM sqlite_sequence "
    "WHERE name = 'outbox' AND seq > 0)",
    "postgresql": "SELECT EXISTS (SELECT 1 FROM outbox) OR COALESCE((SELECT "
    "has_sequence_privilege(s, 'SELECT, USAGE') AND pg_sequence_last_value(s) IS NOT NULL "
    "FROM pg_get_serial_sequence('outbox', 'seq') AS s), false)",
}
"""Whether the outbox ever held a row: one still there (a dead letter is kept), or its
sequence used (delivered rows are deleted; a sequence the store's role may not read, or
one a restore reset, leaves only the rows to go by)."""

_POSTGRES_LANES = 2
"""Ingest transactions one process runs at once on PostgreSQL (SQLite: one). Two, not
more: what waits meanwhile joins the next group, so a lane's statement carries more
events, and fewer statements cost the server less. Measured beside the server on two
cores against one commit per request (bench_service, paired rounds): 2 lanes gave
0.99-1.08x at 25 events x 16 clients, 0.85-0.89x at 500 x 4 and 0.99-1.00x at 1 x 16;
4 lanes gave 0.94x, 0.83x and 1.00-1.15x (one event a request gains from more lanes,
the others lose); one lane starved batches of 500 (0.72x)."""

ROLLED_BACK_RETRIES = 3
"""Times a group is written again after the server rolled its transaction back."""

_INHERITED: list[AsyncEngine] = []
"""Engines a forked child inherited, kept from the collector for good: collected, asyncpg
would end each connection (a Terminate on the socket the parent still uses, and its
descriptor taken out of the epoll both share), and the parent's next statement hung
until its timeout. Never used, never closed: they are the parent's."""

_MIGRATE_ATTEMPTS = 25
"""Checks of a new SQLite store's schema while other processes create it (~6 s in all)."""


_PLANNED_FOR_ITS_CUSTOMERS = sa.text("SET LOCAL plan_cache_mode = force_custom_plan")
"""A page of several customers' events is planned for the customers it names: after
five pages PostgreSQL's generic plan read every remaining event of those customers by
the customer index and sorted them, a page at a time (review: 400,000 events of two
customers exported in 48 s against 3 s for one; 181 s for 800,000)."""


class SqlProvider(BaseProvider):
    """Every operation, aggregation and window of the memory provider, kept in a database."""

    name = "sql"
    default_capabilities = CAPABILITIES

    def __init__(self, settings: SqlSettings | None = None) -> None:
        settings = settings or SqlSettings()
        self.store = StoreUrl(settings.url)
        self._bounds = StoreBounds(
            connect=settings.connect_timeout,
            statement=settings.statement_timeout,
            pool=settings.pool_timeout,
        )
        self._upgrade = (
            settings.auto_upgrade
            if settings.auto_upgrade is not None
            else self.store.backend == "sqlite"
        )
        self._engine: AsyncEngine | None = None
        self._engine_pid = 0  # the process that made it
        self._checkpoints: Checkpoints | None = None  # an SQLite file's, while it is open
        self._unclosed: weakref.finalize[Any, Any] | None = None  # stops them if collected
        self._made_in = os.getpid()
        self._unverifiable_said = False  # a notice no mirror could verify, logged once
        self._meter_copy = MeterCopy()
        self._mirror_names = tuple(settings.mirrors)
        remote = self.store.backend == "postgresql"
        self._clock = StoreClock(self._transaction if remote else None)
        """The clock of the marks forwarders on several hosts write and reconcile reads."""
        self.forwarder = Forwarder(
            self._transaction,
            build_mirrors(settings.mirrors, self.store),
            lease=settings.mirror_lease,
            clock=self._clock,
        )
        """Delivers what the outbox owes the mirrors (`metering mirror run`, the service)."""
        # SQLite has one writer at a time; PostgreSQL overlaps a few transactions
        self._group_commit = GroupCommit(
            self._write_group,
            lanes=1 if self.store.backend == "sqlite" else _POSTGRES_LANES,
            max_events=CAPABILITIES.max_batch_size,
        )
        self._ready: asyncio.Lock | None = None
        self._writers: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"SqlProvider({self.store.shown!r})"

    # connections, with the schema checked once and failures named by the store

    async def _connected(self) -> AsyncEngine:
        if self._engine is not None:
            if self._engine_pid == os.getpid():
                return self._engine
            # Made before a fork (gunicorn --preload, multiprocessing): its connections
            # are the parent's sockets and aiosqlite's threads, which the child would
            # share or wait on for ever. Left to the parent, and the child makes its own.
            self._let_go()
        self._ready = self._ready or asyncio.Lock()
        async with self._ready:
            if self._engine is None:
                if self.store.sqlite_path == default_store_path():
                    default_store_path().parent.mkdir(parents=True, exist_ok=True)
                engine = self.store.engine(self._bounds)
                # On PostgreSQL a migration (a long rebuild, or the wait for another
                # process's) is not bound by statement_timeout: its own engine, released
                # when done. (SQLite has no statement bound, and `:memory:` one database
                # per engine.)
                migrating = (
                    self.store.engine(replace(self._bounds, statement=None))
                    if self.store.backend == "postgresql"
                    else engine
                )
                try:
                    await self._migrate(migrating)
                except BaseException:
                    await engine.dispose()
                    raise
                finally:
                    if migrating is not engine:
                        await migrating.dispose()
                self._engine, self._engine_pid = engine, os.getpid()
                path = self.store.sqlite_path
                if path is not None:
                    self._checkpoints = Checkpoints(path).start()
                    # a store never closed: its thread ends when it is collected
                    self._unclosed = weakref.finalize(self, self._checkpoints.stop_soon)
        return self._engine

    async def _migrate(self, engine: AsyncEngine) -> None:
        """Bring the schema to this code's. Processes opening a new SQLite file together
        race to create it; a loser sees tables another is still creating, waits a moment
        and checks again, until the winner has stamped its revision (three immediate
        retries were not enough for four processes on two busy cores)."""
        for attempt in range(_MIGRATE_ATTEMPTS):
            try:
                async with engine.begin() as connection:
                    await connection.run_sync(
                        migrate, upgrade=self._upgrade, shown=self.store.shown
                    )
                    await self._register_mirrors(connection)
                return
            except sa.exc.OperationalError as exc:
                racing = "already exists" in str(exc) or "locked" in str(exc)
                if not racing or attempt == _MIGRATE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.02 * (attempt + 1))

    async def _register_mirrors(self, connection: AsyncConnection) -> None:
        """Note when each configured mirror first met this store: what was stored before
        is what a backfill sends it. Unknown (NULL) on a store that owed mirrors events
        before any was noted (forwarding before 0005): the mirror may have had them."""
        if not self._mirror_names:
            return
        dialect = connection.dialect.name
        now: Any = store_now(dialect)  # the clock events' ingested_at is by
        # Unknown while no mirror's time is known on a store that owed mirrors events:
        # every mirror it had then is first noted after the upgrade, by whichever
        # process opens with it, and only a time a caller gave ends that (review).
        known = sa.select(mirrors.c.name).where(mirrors.c.added_at.is_not(None)).limit(1)
        if await connection.scalar(known) is None and await connection.scalar(
            sa.text(_OUTBOX_EVER_WRITTEN[dialect])
        ):
            now = None
        await connection.execute(
            self._insert(mirrors)
            .values([{"name": name, "added_at": now} for name in self._mirror_names])
            .on_conflict_do_nothing(index_elements=["name"])
        )

    async def schema_revision(self) -> tuple[str | None, str]:
        """The store's schema revision (None when empty) and this code's newest."""
        path = self.store.sqlite_path
        if path is not None and not path.exists():
            return None, schema_revisions()[0]
        engine = self.store.engine(self._bounds)
        try:
            async with engine.connect() as connection:
                current = await connection.run_sync(current_revision)
        except STORE_FAILURES as exc:
            raise store_error(exc, self.store) from exc
        finally:
            await engine.dispose()
        return current, schema_revisions()[0]

    async def upgrade_schema(self) -> str:
        """Create or upgrade the schema to this code's newest revision; returns it."""
        self._upgrade = True
        try:
            engine = await self._connected()
        except STORE_FAILURES as exc:
            raise store_error(exc, self.store) from exc
        async with engine.connect() as connection:
            revision = await connection.run_sync(current_revision)
        assert revision is not None
        return revision

    @asynccontextmanager
    async def _transaction(self, *, writes: bool = True) -> AsyncIterator[AsyncConnection]:
        """A transaction on a pooled connection. On SQLite, this process's writers take
        turns, first come first served: several would otherwise contend for the file's one
        write lock through SQLite's busy handler, which sleeps and retries, and a request
        could wait for seconds behind later ones (measured under 16 concurrent clients)."""
        async with self._failures_named():
            engine = await self._connected()
            async with self._turn(writes), engine.begin() as connection:
                yield connection

    @asynccontextmanager
    async def _autocommitted(self) -> AsyncIterator[Asyncpg]:
        """A PostgreSQL connection for statements that each commit alone, used raw."""
        # entered in turn: a failure to connect is named too
        async with self._failures_named(), Asyncpg.checkout(await self._connected()) as driver:
            yield driver

    @asynccontextmanager
    async def _failures_named(self) -> AsyncIterator[None]:
        """The store's failures as the library's errors, naming the store."""
        try:
            yield
        except MeteringError:
            raise
        except STORE_FAILURES as exc:
            if self._engine is not None and _REOPEN.search(str(exc)):
                # SQLite opened the file read-only (or lost it): its pooled connections stay
                # that way after the file is writable again, so the next ones open it anew.
                await self._engine.dispose()
            raise store_error(exc, self.store) from exc

    def _turn(self, writes: bool) -> AbstractAsyncContextManager[Any]:
        if not writes or self.store.backend != "sqlite":
            return nullcontext()
        # One turn per event loop: a lock belongs to the loop that uses it, and one held
        # by a task of a loop that has closed would never be released.
        for closed in [loop for loop in self._writers if loop.is_closed()]:
            del self._writers[closed]
        return self._writers.setdefault(asyncio.get_running_loop(), asyncio.Lock())

    @property
    def _insert(self) -> Any:
        return postgresql.insert if self.store.backend == "postgresql" else sqlite.insert

    # meters

    async def _owe_change(self, connection: AsyncConnection, kind: str, key: str) -> None:
        """Owe each mirror a meter's or a customer's change (in its transaction)."""
        await owe(connection, kind, [key], self._mirror_names, at=epoch_micros(datetime.now(UTC)))

    async def _check_mirrors_bill(self, meter: MeterCreate) -> None:
        """Refuse a meter a mirror could not bill, before the ledger has it: an aggregation
        the mirror lacks, or a meter of its event name there that bills otherwise (Stripe
        keeps event names unique, deactivated meters too). A mirror that cannot say now
        (down) is owed the meter, and refuses it later as a dead letter if it must."""
        for name, mirror in self.forwarder.mirrors.items():
            try:
                capabilities = await mirror.load_capabilities()
                theirs = await named(mirror, meter.event_name)
            except Exception:  # the mirror is down: the outbox catches it up
                continue
            reason = refusal(name, meter.aggregation, capabilities)
            if reason is None and theirs is not None:
                reason = mismatch(name, meter.event_name, theirs, meter)
            if reason is not None:
                raise ValidationError(reason, field="aggregation", value=meter.aggregation.value)

    async def create_meter(self, meter: MeterCreate) -> Meter:
        await self._check_mirrors_bill(meter)
        now = epoch_micros(datetime.now(UTC))
        meter_id = f"mtr_{secrets.token_hex(12)}"
        row = {
            "id": meter_id,
            "event_name": meter.event_name,
            "display_name": meter.display_name or meter.event_name,
            "aggregation": meter.aggregation.value,
            "dimensions": list(meter.dimensions),
            "description": meter.description,
            "unique_dimension": meter.unique_dimension,
            "status": "active",
            "created_at": now,
            "updated_at": now,
        }
        statement = (
            self._insert(meters)
            .values(row)
            .on_conflict_do_nothing(index_elements=["event_name"])
            .returning(meters.c.seq)
        )
        self._meter_copy.forget()
        async with self._transaction() as connection:
            created = (await connection.execute(statement)).first()
            if created is None:
                existing = await connection.scalar(
                    sa.select(meters.c.id).where(meters.c.event_name == meter.event_name)
                )
                raise ConflictError(
                    f"a meter for event_name={meter.event_name!r} exists already: {existing}"
                )
            await self._owe_change(connection, "meter", meter_id)
        return meter_from_row(SimpleNamespace(**row))

    async def _meter_row(self, connection: AsyncConnection, meter_id: str) -> Any:
        row = (await connection.execute(sa.select(meters).where(meters.c.id == meter_id))).first()
        if row is None:
            raise NotFoundError(f"no meter with id {meter_id!r}")
        return row

    async def fetch_meter(self, meter_id: str) -> Meter:
        async with self._transaction(writes=False) as connection:
            return meter_from_row(await self._meter_row(connection, meter_id))

    async def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        check_limit(limit)
        after = decode_cursor(cursor)
        statement = (
            sa.select(meters).where(meters.c.seq > after).order_by(meters.c.seq).limit(limit + 1)
        )
        async with self._transaction(writes=False) as connection:
            rows = (await connection.execute(statement)).all()
        page = rows[:limit]
        return Page[Meter](
            items=[meter_from_row(row) for row in page],
            next_cursor=encode_cursor(page[-1].seq) if len(rows) > limit else None,
        )

    async def update_meter(self, meter_id: str, update: MeterUpdate) -> Meter:
        changes: dict[str, Any] = {name: getattr(update, name) for name in update.model_fields_set}
        changes["updated_at"] = epoch_micros(datetime.now(UTC))
        self._meter_copy.forget()
        async with self._transaction() as connection:
            await self._meter_row(connection, meter_id)
            await connection.execute(
                sa.update(meters).where(meters.c.id == meter_id).values(changes)
            )
            await self._owe_change(connection, "meter", meter_id)
            return meter_from_row(await self._meter_row(connection, meter_id))

    async def delete_meter(self, meter_id: str) -> None:
        """The meter goes; its events stay as ids already seen, counted nowhere."""
        self._meter_copy.forget()
        async with self._transaction() as connection:
            deleted = await connection.execute(sa.delete(meters).where(meters.c.id == meter_id))
            if deleted.rowcount == 0:
                raise NotFoundError(f"no meter with id {meter_id!r}")
            await self._owe_change(connection, "meter", meter_id)

    # usage

    async def ingest_batch(self, batch: Sequence[UsageEvent]) -> IngestResult:
        return await self._store_events(batch, lowering_refused=False)

    async def ingest_batch_raising_only(self, batch: Sequence[UsageEvent]) -> IngestResult:
        """Meters are read in the insert's own transaction: no other process's change to
        a meter can be missed, as a copy of the meters kept elsewhere could."""
        return await self._store_events(batch, lowering_refused=True)

    async def _store_events(
        self, batch: Sequence[UsageEvent], *, lowering_refused: bool
    ) -> IngestResult:
        return await self._group_commit.ingest(batch, lowering_refused=lowering_refused)

    async def _write_group(self, group: Sequence[Ingest]) -> list[IngestResult]:
        """`_write_group_once`, again while the connection it used is found to be one the
        server had closed while it sat in the pool (a server restarted or failed over:
        connections are not pinged on checkout; each found is dropped from the pool, or
        the whole pool with it, so this ends), and up to `ROLLED_BACK_RETRIES` times when
        the server rolled the transaction back (a deadlock: writers of two versions of
        this code, mid-upgrade, can lock the same ids in different orders). Writing again
        is safe: a row that did commit is a duplicate of itself, so nothing counts
        twice, and no caller sees an outage."""
        rollbacks = 0
        for _ in range(POOLED + ROLLED_BACK_RETRIES):
            try:
                return await self._write_group_once(group)
            except ProviderUnavailableError as exc:
                cause = exc.__cause__
                if isinstance(cause, sa.exc.DBAPIError) and cause.connection_invalidated:
                    continue
                if cause is None or not rolled_back(cause) or rollbacks == ROLLED_BACK_RETRIES:
                    raise
                rollbacks += 1
        return await self._write_group_once(group)

    async def _write_group_once(self, group: Sequence[Ingest]) -> list[IngestResult]:
        """Several callers' events in one transaction; each caller's answer, as if they
        had been written one after another in the group's order. On PostgreSQL, by one
        statement judged by this process's copy of the meters, which the statement checks
        (one round trip); when the copy is stale, again in a transaction that reads them."""
        ingested = await self._clock.micros()  # before a connection is held: it may take one
        if self.store.backend == "postgresql":
            answers = await self._write_checked(group, ingested)
            if answers is not None:
                return answers
        names = {event.event_name for ingest in group for event in ingest.events}
        async with self._transaction() as connection:
            judged = Judged.of(group, await meters_named(connection, names))
            rows = judged.rows
            inserted = (
                await insert_events(
                    connection, rows, judged.rolled_up, self._mirror_names, ingested=ingested
                )
                if rows
                else set()
            )
            refused = judged.refused_ids
            known: set[str] = set()
            if refused:  # an id seen before is a duplicate, whatever became of its meter
                known = set(
                    await connection.scalars(
                        sa.select(events.c.id).where(events.c.id.in_(list(refused)))
                    )
                )
        self._meter_copy.keep(names, judged.meters)
        return judged.answers(inserted, known)

    async def _write_checked(
        self, group: Sequence[Ingest], ingested: int
    ) -> list[IngestResult] | None:
        """The group in one checked statement, or None (nothing written) if the copy of
        the meters it was judged by is not the store's."""
        names = {event.event_name for ingest in group for event in ingest.events}
        judged = Judged.of(group, self._meter_copy.of(names))
        async with self._autocommitted() as driver:
            checked = await insert_events_checked(
                driver,
                judged.rows,
                judged.rolled_up,
                judged_by=judged.meters.values(),
                unmetered=names - judged.meters.keys(),
                refused=judged.refused_ids,
                mirrors=self._mirror_names,
                ingested=ingested,
            )
        if not checked.fresh:
            return None
        return judged.answers(checked.inserted, checked.known)

    async def fetch_usage(self, query: UsageQuery) -> Usage:
        async with self._transaction(writes=False) as connection:
            row = await self._meter_row(connection, query.meter_id)
            meter = meter_from_row(row)
            statement, plan = usage_statement(connection.dialect.name, row.seq, meter, query)
            found = (await connection.execute(statement)).all()
        if len(found) < OFF_LOOP_ROWS:
            rows = usage_rows(found, meter, query, plan)
        else:  # typing 100,000 rows holds a loop for most of a second: other requests wait
            rows = await asyncio.to_thread(usage_rows, found, meter, query, plan)
        return rules.answer(query, meter.aggregation, rows)

    async def list_usage_events(self, query: EventQuery) -> Page[StoredEvent]:
        if query.meter_id is not None:
            where = meters.c.id == query.meter_id
            missing = f"no meter with id {query.meter_id!r}"
        else:
            where = meters.c.event_name == query.event_name
            missing = f"no meter for event_name={query.event_name!r}"
        async with self._transaction(writes=False) as connection:
            row = (await connection.execute(sa.select(meters).where(where))).first()
            if row is None:
                raise NotFoundError(missing)
            filters = rules.check_filters(meter_from_row(row), query.filters)
            dialect = connection.dialect.name
            if dialect == "postgresql" and len(query.customer_ids) > 1:
                await connection.execute(_PLANNED_FOR_ITS_CUSTOMERS)
            statement = events_statement(dialect, row.seq, query, filters)
            found = (await connection.execute(statement)).all()
        return event_page(found, query.limit)

    async def cancel_usage_events(
        self, event_ids: Sequence[str], *, event_name: str | None = None
    ) -> CancelResult:
        async with self._transaction() as connection:
            names = {
                row.id: row.event_name
                for row in await connection.execute(
                    sa.select(events.c.id, events.c.event_name).where(
                        events.c.id.in_(list(event_ids))
                    )
                )
            }
            wanted = rules.cancellable(event_ids, names, event_name)
            cancelled: set[str] = set()
            if wanted:
                gone = (
                    await connection.execute(
                        sa.update(events)
                        .where(events.c.id.in_(wanted), events.c.cancelled == sa.false())
                        .values(cancelled=True)
                        .returning(
                            events.c.id,
                            events.c.meter_seq,
                            events.c.ts,
                            events.c.value,
                            rollup_key(connection.dialect.name),
                        )
                    )
                ).all()
                cancelled = {row[0] for row in gone}
                await self._roll_back_cancelled(connection, gone)
                now = epoch_micros(datetime.now(UTC))
                await owe(connection, "cancel", sorted(cancelled), self._mirror_names, at=now)
        return rules.cancel_verdicts(event_ids, names, cancelled, event_name)

    async def _roll_back_cancelled(self, connection: AsyncConnection, gone: Sequence[Any]) -> None:
        """Negative rollups for cancelled events of rolled-up meters, so their hours
        count what remains (the same transaction as the cancellation)."""
        seqs = {row[1] for row in gone}
        rolled_up = set(
            await connection.scalars(
                sa.select(meters.c.seq).where(
                    meters.c.seq.in_(seqs), meters.c.aggregation.in_(ROLLED_UP)
                )
            )
        )
        counted = [(row[1], row[2], Decimal(str(row[3])), row[4]) for row in gone]
        await add_to_rollups(
            connection, rollup_deltas([r for r in counted if r[0] in rolled_up], sign=-1)
        )

    # customers

    async def create_customer(self, customer: CustomerCreate) -> Customer:
        created = Customer(**customer.model_dump())
        row = {
            "id": customer.id,
            "name": customer.name,
            "email": customer.email,
            "metadata": customer.metadata,
        }
        async with self._transaction() as connection:
            inserted = await connection.execute(
                self._insert(customers)
                .values(row)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(customers.c.id)
            )
            if inserted.first() is not None:
                await self._owe_change(connection, "customer", customer.id)
                return created
            existing = (
                await connection.execute(sa.select(customers).where(customers.c.id == customer.id))
            ).one()
        if customer_from_row(existing) == created:
            return created
        raise ConflictError(f"customer {customer.id!r} exists already with other fields")

    async def delete_customer(self, customer_id: str) -> None:
        async with self._transaction() as connection:
            deleted = await connection.execute(
                sa.delete(customers).where(customers.c.id == customer_id)
            )
            if deleted.rowcount == 0:
                raise NotFoundError(f"no customer with id {customer_id!r}")

    # mirrors

    @property
    def mirrored(self) -> bool:
        return bool(self._mirror_names)

    def deliver_with(self, settings: MeteringSettings) -> None:
        self.forwarder.deliver_with(settings)

    async def forward_mirrors(self) -> None:
        await self.forwarder.run()

    def _mirror(self, mirror: str) -> IMetering:
        try:
            return self.forwarder.mirrors[mirror]
        except KeyError:
            raise ValidationError(
                f"mirror={mirror!r} is not one of this store's mirrors "
                f"({', '.join(self.forwarder.mirrors) or 'none'})",
                field="mirror",
                value=mirror,
            ) from None

    async def link_mirror(self, mirror: str) -> list[MirrorLink]:
        """Bring every meter and customer of the ledger to `mirror` now (what the ledger
        held before the mirror was added): each meter found there by its event name and
        linked, or created; each customer created. A meter the mirror cannot hold is
        reported refused, with the reason; the mirror failing raises."""
        provider = self._mirror(mirror)
        async with self._transaction(writes=False) as connection:
            meter_ids = list(
                await connection.scalars(sa.select(meters.c.id).order_by(meters.c.seq))
            )
            customer_ids = list(
                await connection.scalars(sa.select(customers.c.id).order_by(customers.c.id))
            )
        links: list[MirrorLink] = []
        for kind, keys in (("meter", meter_ids), ("customer", customer_ids)):
            for key in keys:
                try:
                    links.append(await self.forwarder.follow(mirror, provider, kind, key))
                except (Refused, *REFUSALS) as exc:
                    links.append(
                        MirrorLink(
                            mirror=mirror,
                            kind="meter" if kind == "meter" else "customer",
                            id=key,
                            mirror_id=None,
                            outcome=LinkOutcome.refused,
                            reason=str(exc),
                        )
                    )
                if kind == "meter":
                    await self._meter_refused(mirror, key, links[-1].reason)
        return links

    async def _meter_refused(self, mirror: str, meter_id: str, reason: str | None) -> None:
        """Keep what linking a meter found as the forwarder keeps a meter change's
        outcome: refused, a dead letter of the meter, whose events are then refused with
        it (sent, the mirror's meter of that name would bill them by its aggregation:
        probe); linked, no such dead letter left (`mirror retry` would send it again)."""
        refused = sa.and_(
            outbox.c.mirror == mirror,
            outbox.c.kind == "meter",
            outbox.c.event_id == meter_id,
            outbox.c.refused.is_not(None),
        )
        async with self._transaction() as connection:
            await connection.execute(sa.delete(outbox).where(refused))
            if reason is not None:
                now = epoch_micros(datetime.now(UTC))
                await connection.execute(
                    sa.insert(outbox).values(
                        mirror=mirror,
                        kind="meter",
                        event_id=meter_id,
                        created_at=now,
                        refused=reason,
                    )
                )

    async def backfill_mirror(
        self,
        mirror: str,
        *,
        start: datetime,
        end: datetime | None = None,
        mirror_added: datetime | None = None,
    ) -> int:
        """Owe `mirror` the live events of existing meters from `start` to `end` (default:
        now); the number owed, less those a reconcile repair sent the difference for
        (`held_by_repair`). A mirror that remembers ids answers duplicate for those it
        has. One that forgets them (Stripe, after 24 h) would count them twice: it is sent
        only the events stored before it was added to this store (the rest were owed to
        it already), and a range overlapping an earlier backfill is refused. When that is
        unknown (a store that forwarded before 0005), the caller says when it was first
        configured (`mirror_added`, kept), or the backfill is refused."""
        provider = self._mirror(mirror)
        end = end or datetime.now(UTC)
        if end <= start:
            raise ValidationError(
                f"end={end.isoformat()} must be after start={start.isoformat()}",
                field="end",
                value=end.isoformat(),
            )
        capabilities = await provider.load_capabilities()
        oldest = capabilities.max_event_age
        if oldest is not None and start < datetime.now(UTC) - oldest:
            raise ValidationError(
                f"start={start.isoformat()} is older than mirror {mirror!r} accepts "
                f"(events at most {oldest.days} days old): it would refuse them",
                field="start",
                value=start.isoformat(),
            )
        since, until = epoch_micros(start), epoch_micros(end)
        now = await self._clock.micros()  # the clock of ingested_at and added_at
        async with self._transaction() as connection:
            await one_repair_at_a_time(connection, mirror)  # a repair's record seen, or ours
            chosen = sa.select(
                sa.literal(mirror), sa.literal("usage"), events.c.id, events.c.seq, sa.literal(now)
            ).where(
                events.c.ts >= since,
                events.c.ts < until,
                events.c.cancelled == sa.false(),
                events.c.meter_seq.in_(sa.select(meters.c.seq)),
            )
            forgets = capabilities.dedupe_window is not None
            if forgets or mirror_added is not None:  # a time given is checked, never ignored
                added = await self._mirror_added(connection, mirror, mirror_added, now)
            if forgets:
                # Only what no process owed it: the rest it may have had for longer than
                # it remembers ids. (Events stored meanwhile by a process without the
                # mirror configured are not sent: reconcile shows their cells short.)
                await self._refuse_overlap(connection, mirror, since, until)
                chosen = chosen.where(
                    sa.or_(events.c.ingested_at.is_(None), events.c.ingested_at < added)
                )
            # an event a repair sent the difference for is in its correction: sent again, it
            # would count twice, whatever ids the mirror remembers (probe)
            chosen = chosen.where(~held_by_repair(mirror))
            # before the events, so that the forwarder takes them first (changes go ahead
            # of what is owed after them): a customer gone from the ledger, made there by
            # its id, or Stripe refuses its events for good (review)
            picked = chosen.whereclause
            assert picked is not None
            gone = (
                sa.select(
                    sa.literal(mirror),
                    sa.literal("customer"),
                    events.c.customer_id,
                    sa.literal(now),
                )
                .distinct()
                .where(
                    picked,
                    ~sa.exists(sa.select(1).where(customers.c.id == events.c.customer_id)),
                )
            )
            await connection.execute(
                sa.insert(outbox).from_select(["mirror", "kind", "event_id", "created_at"], gone)
            )
            chosen = chosen.order_by(events.c.ts, events.c.seq)
            owed = await connection.execute(
                sa.insert(outbox).from_select(
                    ["mirror", "kind", "event_id", "event_seq", "created_at"], chosen
                )
            )
            await connection.execute(
                sa.insert(mirror_backfills).values(mirror=mirror, start=since, end=until, at=now)
            )
            return owed.rowcount

    @staticmethod
    async def _mirror_added(
        connection: AsyncConnection, mirror: str, given: datetime | None, now: int
    ) -> int:
        """When `mirror` was added to this store: as noted (none noted: now), else as
        `given` (and noted from then on); unknown and not given is refused."""
        noted = (
            await connection.execute(sa.select(mirrors.c.added_at).where(mirrors.c.name == mirror))
        ).first()
        if noted is None:
            return now
        if given is not None and epoch_micros(given) > now:
            raise ValidationError(
                f"mirror_added={given.isoformat()} is later than now: every event would "
                "read as stored before the mirror was added, and be sent again",
                field="mirror_added",
                value=given.isoformat(),
            )
        if noted.added_at is not None:
            if given is not None and epoch_micros(given) != noted.added_at:
                raise ValidationError(
                    f"mirror {mirror!r} is noted as added at "
                    f"{from_epoch_micros(noted.added_at).isoformat()}, not "
                    f"{given.isoformat()}: leave mirror_added out",
                    field="mirror_added",
                    value=given.isoformat(),
                )
            return int(noted.added_at)
        if given is None:
            raise ValidationError(
                f"when mirror {mirror!r} was added is unknown: this store forwarded to its "
                "mirrors before it noted when each was added, and the mirror forgets event "
                "ids, so a backfill could send it again what it had (billed twice). Say "
                "when it was first configured here (mirror_added, --mirror-added)",
                field="mirror_added",
                value=None,
            )
        await connection.execute(
            sa.update(mirrors)
            .where(mirrors.c.name == mirror, mirrors.c.added_at.is_(None))
            .values(added_at=epoch_micros(given))
        )
        return epoch_micros(given)

    @staticmethod
    async def _refuse_overlap(
        connection: AsyncConnection, mirror: str, since: int, until: int
    ) -> None:
        earlier = (
            await connection.execute(
                sa.select(mirror_backfills.c.start, mirror_backfills.c.end).where(
                    mirror_backfills.c.mirror == mirror,
                    mirror_backfills.c.start < until,
                    mirror_backfills.c.end > since,
                )
            )
        ).first()
        if earlier is not None:
            began, ended = (from_epoch_micros(micros).isoformat() for micros in earlier)
            raise ValidationError(
                f"mirror {mirror!r} was backfilled from {began} to {ended} already, and "
                "forgets event ids after a while: sending those events again would count "
                "them twice",
                field="start",
                value=from_epoch_micros(since).isoformat(),
            )

    async def retry_mirror_dead_letters(self, mirror: str) -> int:
        """Owe `mirror` again what it refused (once the cause is fixed: a meter or a
        customer it lacked); the number of rows. They keep their place in order. An event
        a reconcile repair holds (`held_by_repair`: stored before the repair counted its
        cell) stays a dead letter: the repair sent the mirror its difference, and the
        event again would count it twice."""
        self._mirror(mirror)
        repaired = sa.select(1).where(
            events.c.id == outbox.c.event_id, outbox.c.kind == "usage", held_by_repair(mirror)
        )
        statement = (
            sa.update(outbox)
            .where(
                outbox.c.mirror == mirror,
                outbox.c.refused.is_not(None),
                ~sa.exists(repaired),
            )
            .values(refused=None, claimed_until=None, attempts=0)
        )
        async with self._transaction() as connection:
            await one_repair_at_a_time(connection, mirror)  # a repair's record seen, or ours
            owed = (await connection.execute(statement)).rowcount
        # behind where this process's forwarder claims: taken next, in order (a forwarder
        # in another process takes them at its next sweep, within a quarter lease)
        self.forwarder.owed_again(mirror)
        return owed

    async def receive_notice(self, source: str, body: bytes, headers: Mapping[str, str]) -> int:
        """Record a refusal notice from a mirror of provider `source`: each sampled event
        the ledger holds becomes a dead letter of that mirror with the mirror's reason
        (reconcile then marks its cell `refused`, and `mirror retry` sends it again); the
        number recorded. A notice already recorded (a replay) records nothing."""
        readers = [
            (name, mirror)
            for name, mirror in self.forwarder.mirrors.items()
            if mirror.name == source and isinstance(mirror, ReportsRefusals)
        ]
        if not readers:
            raise NotFoundError(f"no mirror of provider {source!r} sends notices to this store")
        refusal: ValidationError | None = None
        for name, reader in readers:
            try:
                # a plugin written before `recorded` existed is called as it was
                asks = "recorded" in inspect.signature(reader.read_refusal_notice).parameters
                extra = {"recorded": self._notice_recorded} if asks else {}
                notice = await reader.read_refusal_notice(body, headers, **extra)
            except ValidationError as exc:
                if exc.field == "body":  # this mirror's, verified, and not a notice
                    raise
                refusal = exc  # not this mirror's secret
                continue
            except ConfigurationError as exc:  # no secret: another mirror may verify it
                if not self._unverifiable_said:
                    logger.warning("a notice from %s arrived unverified: %s", source, exc)
                    self._unverifiable_said = True
                continue
            return 0 if notice is None else await self._record_notice(name, notice)
        if refusal is not None:
            raise refusal
        # No mirror can verify it: the operator's to fix (said once in the log), and not
        # a failure behind the service that anyone, with no key, could mark /health by.
        raise NotFoundError(
            f"no mirror of provider {source!r} here has a webhook secret to verify notices"
        )

    async def _notice_recorded(self, notice_id: str) -> bool:
        async with self._transaction(writes=False) as connection:
            found = await connection.scalar(
                sa.select(mirror_notices.c.id).where(mirror_notices.c.id == notice_id)
            )
        return found is not None

    async def _record_notice(self, mirror: str, notice: RefusalNotice) -> int:
        now = epoch_micros(datetime.now(UTC))
        async with self._transaction() as connection:
            first = await connection.execute(
                self._insert(mirror_notices)
                .values(
                    id=notice.id,
                    mirror=mirror,
                    kind=notice.kind,
                    error_count=notice.error_count,
                    received_at=now,
                )
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(mirror_notices.c.id)
            )
            if first.first() is None:
                return 0  # recorded before
            named = list(notice.refused)
            found = sa.select(events.c.id, events.c.seq).where(events.c.id.in_(named))
            stored = {row.id: row.seq for row in await connection.execute(found)}
            known = set(
                await connection.scalars(
                    sa.select(outbox.c.event_id).where(
                        outbox.c.mirror == mirror,
                        outbox.c.kind == "usage",
                        outbox.c.event_id.in_(named),
                    )
                )
            )
            rows = [
                {
                    "mirror": mirror,
                    "kind": "usage",
                    "event_id": event_id,
                    "event_seq": stored[event_id],
                    "created_at": now,
                    "refused": reason,
                }
                for event_id, reason in notice.refused.items()
                if event_id in stored and event_id not in known
            ]
            if rows:
                await connection.execute(sa.insert(outbox), rows)
        self.forwarder.count_reported(mirror, notice.error_count)
        return len(rows)

    async def reconcile(
        self,
        mirror: str,
        *,
        start: datetime,
        end: datetime,
        window: Window = Window.DAY,
        meter_ids: Sequence[str] | None = None,
        repair: bool = False,
    ) -> ReconcileReport:
        """Compare each meter, customer and window here with what `mirror` holds; with
        `repair`, send the mirror each short sum or count cell's difference."""
        return await reconcile(
            self,
            self._transaction,
            mirror,
            self._mirror(mirror),
            self._clock,
            start=start,
            end=end,
            window=window,
            meter_ids=meter_ids,
            repair=repair,
        )

    async def mirror_status(self) -> list[MirrorStatus]:
        """What each mirror is still owed: depth, oldest undelivered age, dead letters."""
        return await self.forwarder.status()

    async def flush_mirrors(self, timeout: float | None = None) -> list[MirrorStatus]:
        """Forward until every mirror has everything owed to it, or refused it; the
        statuses then. `TimeoutError` after `timeout` seconds (a mirror down)."""

        async def drain() -> list[MirrorStatus]:
            while True:
                moved = await self.forwarder.forward_all()
                statuses = await self.forwarder.status()
                if all(status.depth == 0 for status in statuses):
                    return statuses
                if not moved:  # a mirror down, or rows leased by another forwarder
                    await asyncio.sleep(0.1)

        return await asyncio.wait_for(drain(), timeout)

    def _let_go(self) -> None:
        """Forget an engine another process made, closing nothing of it (`_INHERITED`)."""
        if self._engine is not None:
            _INHERITED.append(self._engine)
        self._engine, self._ready = None, None
        # the parent's thread, which a child does not have: never touched here (its lock
        # may have been copied held), nor when the child exits
        self._checkpoints = None
        self._forget_checkpoints()

    def _forget_checkpoints(self) -> None:
        if self._unclosed is not None:
            self._unclosed.detach()
            self._unclosed = None

    async def aclose(self) -> None:
        """Close what this process opened; in a forked child, nothing of the parent's (its
        mirrors' clients may hold the parent's connections too)."""
        if self._engine is not None and self._engine_pid != os.getpid():
            self._let_go()
        if os.getpid() == self._made_in:
            for mirror in self.forwarder.mirrors.values():
                await mirror.aclose()
        if self._checkpoints is not None:
            await asyncio.to_thread(self._checkpoints.stop)
            self._checkpoints = None
            self._forget_checkpoints()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
