"""The ledger's mirrors: other providers this store's usage is copied to, exactly once.

Each event the store accepts, and each cancellation, is owed to every mirror in the
transaction that stores it (the `outbox` table). A forwarder leases a mirror's oldest
rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so forwarders of one database never send
a row at the same time; SQLite has one writer), delivers them through the pipeline's
delivery policy (batches of the mirror's size, retries with backoff, Retry-After,
halving), and deletes them, or marks them refused with the mirror's reason (a mirror
dead letter). A forwarder killed between sending and marking leaves its lease to expire: the
rows are sent again, and the mirror, which dedupes by id, answers duplicate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import operator
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import sqlalchemy as sa
from opentelemetry import metrics
from sqlalchemy.dialects import postgresql, sqlite

from metering_core import rules
from metering_core.collector import eased
from metering_core.config import (
    MeteringSettings,
    ProviderSettings,
    resolve_provider_settings,
    settings_from_options,
)
from metering_core.delivery import GAVE_UP, DeliveryPolicy
from metering_core.epoch import epoch_micros, from_epoch_micros
from metering_core.errors import (
    ConfigurationError,
    ConflictError,
    NotFoundError,
    UnsupportedOperationError,
    ValidationError,
)
from metering_core.interface import IMetering
from metering_core.models import CancelResult, Customer, MirrorLink, MirrorStatus, UsageEvent
from metering_core.sql.claim_cursor import ClaimCursor
from metering_core.sql.driver import rows_of
from metering_core.sql.mirror_sync import (
    Refused,
    ledger_customer,
    ledger_meter,
    sync_customer,
    sync_meter,
)
from metering_core.sql.rows import Transaction, Trusted
from metering_core.sql.schema import events, meters, mirror_deliveries, outbox
from metering_core.sql.settings import masked
from metering_core.sql.store import StoreUrl
from metering_core.sql.store_clock import StoreClock

__all__ = ["IDLE", "LEASE", "PASSES", "REFUSED_METERS", "Forwarder", "build_mirrors"]

logger = logging.getLogger("metering")

_rows = metrics.get_meter("metering_core").create_counter(
    "metering.mirror.rows",
    unit="{row}",
    description="Rows settled with a mirror, by outcome (delivered, refused; withheld: "
    "settled unsent; reported: refused later, by a notice)",
)

IDLE = 1.0
"""Seconds a running forwarder rests when nothing is owed."""

PASSES = 4
"""Passes a forwarder runs at once per mirror."""

LEASE = 120.0
"""Seconds a forwarder holds the rows it took, unless configured; past it (a forwarder
killed mid-batch) another takes them again."""


REFUSALS = (ValidationError, ConflictError, NotFoundError, UnsupportedOperationError)
"""A mirror's answers that say "never": the row becomes a dead letter. Anything else
(an outage, credentials, a server error) is the mirror failing, and the row waits."""


def build_mirrors(
    configured: Mapping[str, Mapping[str, Any]], ledger: StoreUrl
) -> dict[str, IMetering]:
    """The mirror providers `SqlSettings.mirrors` names, each built from its options as
    the facade builds a provider: what they leave out from its METERING_<PROVIDER>_*
    variables (the place for its secrets, which stay `SecretStr`), and a bad option is a
    `ConfigurationError` that never shows a secret. A sql mirror takes its options alone:
    METERING_SQL_* are the `ledger`'s (probe: its mirrors made it mirror itself, without
    end, and its url made it the ledger's own store, which it may not be)."""
    from metering_core.plugins import get_provider  # the plugin registry imports providers

    built: dict[str, IMetering] = {}
    for name, options in configured.items():
        given = dict(options)
        kind = given.pop("provider", None)
        if not isinstance(kind, str):
            raise ConfigurationError(
                f'mirrors.{name}: name its provider, e.g. {{"provider": "stripe", ...}}'
            )
        try:
            spec = get_provider(kind)
            settings = _mirror_settings(spec.settings_model, kind, given, ledger)
        except ConfigurationError as exc:  # which mirror's (two may share a provider)
            raise ConfigurationError(f"mirrors.{name}: {exc}") from None
        built[name] = spec.factory(settings)
    return built


def _mirror_settings(
    model: type[ProviderSettings], kind: str, given: Mapping[str, Any], ledger: StoreUrl
) -> ProviderSettings:
    if kind != "sql":
        return resolve_provider_settings(model, kind, {}, given)
    if "url" not in given:
        raise ConfigurationError("a sql mirror names its store's url")
    if given.get("mirrors"):  # nothing forwards them: its outbox would only grow
        raise ConfigurationError("a sql mirror has no mirrors of its own")
    settings = settings_from_options(model, given, "sql mirror")
    url = str(given["url"])
    if ledger.same_store(StoreUrl(url)):
        raise ConfigurationError(f"url={masked(url)!r} is the ledger's own store")
    return settings


_BARRIER = {
    # Usage and cancellations wait behind the oldest meter or customer change still
    # owed (an event of a meter the mirror does not have yet would be refused), and a
    # change waits until what was stored before it has gone. Each subquery reads one
    # row of its partial index (outbox_changes, outbox_owed).
    False: """kind IN ('usage', 'cancel') AND seq < COALESCE((
        SELECT min(seq) FROM outbox
        WHERE mirror = :mirror AND refused IS NULL AND kind IN ('meter', 'customer')
    ), 9223372036854775807)""",
    True: """kind IN ('meter', 'customer') AND seq < COALESCE((
        SELECT min(seq) FROM outbox
        WHERE mirror = :mirror AND refused IS NULL AND kind IN ('usage', 'cancel')
    ), 9223372036854775807) AND NOT EXISTS (
        SELECT 1 FROM outbox AS held
        WHERE held.mirror = :mirror AND held.refused IS NULL
          AND held.kind IN ('meter', 'customer') AND held.claimed_until >= :now
    )""",
}
"""Changes go one pass at a time per mirror (none while another pass holds some), each
in order: two passes could otherwise apply an update of a meter after its deletion."""


_CHANGES_OWED = sa.text(
    "SELECT 1 FROM outbox WHERE mirror = :mirror AND refused IS NULL "
    "AND kind IN ('meter', 'customer') LIMIT 1"
)
_ONE_CHANGE_PASS = sa.text("SELECT pg_advisory_xact_lock(hashtext('metering mirror ' || :mirror))")
"""On PostgreSQL, passes claiming changes at the same moment would not see each other's
uncommitted lease (READ COMMITTED): they take turns, for the claim's transaction."""


def _claim(dialect: str, changes: bool) -> sa.TextClause:
    def picked(column: str) -> str:
        return f"""
        SELECT {column} FROM outbox
        WHERE mirror = :mirror AND refused IS NULL
          AND (claimed_until IS NULL OR claimed_until < :now) AND seq > :after
          AND {_BARRIER[changes]}
        ORDER BY seq LIMIT :limit"""

    # On PostgreSQL the rows picked, skipping those another pass is claiming, are updated
    # where they lie (their ctid, stable while this statement holds their lock): as
    # `IN (…)` the planner hashed them and scanned the whole outbox for each claim (35 ms
    # a claim of 10,000 rows, and growing with the outbox), and through the primary key it
    # descended the index once a row (16 of 24 ms; by ctid, 3). A row another session
    # changed after this statement began is locked as it is now, but that version is not
    # the one the update can see: it is left for a later claim (review), and this claim
    # comes back short, so the next starts from the head.
    rows = (
        f"ctid = ANY(ARRAY({picked('ctid')} FOR UPDATE SKIP LOCKED))"
        if dialect == "postgresql"
        else f"seq IN ({picked('seq')})"
    )
    claim = f"""
        UPDATE outbox SET claimed_until = :until, attempts = attempts + 1
        WHERE {rows}
        RETURNING seq, kind, event_id, event_seq"""
    if changes:
        return sa.text(claim)
    if dialect == "postgresql":  # the events with their rows, in the claim's statement
        held = _HELD_ROWS.format(rows="claimed", joined=_BY_SEQ, held="")
        return sa.text(f"WITH claimed AS ({claim}\n    ){held}")
    return sa.text(claim)  # then `_HELD`, in the claim's transaction


class _Owed(NamedTuple):
    """A leased outbox row."""

    seq: int
    kind: str
    event_id: str


_HELD_ROWS = """
    SELECT o.seq, o.kind, o.event_id, e.event_name, e.customer_id, e.ts, e.value,
           CAST(e.dimensions AS TEXT),
           e.cancelled OR (e.meter_seq NOT IN (SELECT seq FROM meters)
                           AND e.event_name IN (SELECT event_name FROM meters))
    FROM {rows} AS o LEFT JOIN events AS e ON o.kind = 'usage' AND {joined}{held}
    ORDER BY o.seq
    """
"""A pass's usage and cancellation rows (seq, kind, event id), a usage row's event with
it (its name None if the row names none stored). The last column: nothing to send, the
event cancelled, or its meter deleted and another made with its event name: the
mirror's meter of that name is the new meter's now, and would bill an event the ledger
counts nowhere (probe: a dead letter retried as reconcile advises). A deleted meter's
event is sent while no other has its name: the mirror's meter is still the one the
event was stored for (one the ledger found there outlives the ledger's; one it made is
deleted after the rows owed before it)."""

_BY_SEQ = "e.seq = o.event_seq AND e.id = o.event_id"
"""Each event by the events' primary key (by their text ids it cost PostgreSQL half
again as much). The id must match too: a seq that named another event (a store copied
with its events renumbered) sends nothing rather than the wrong event."""

_LEASED = """
    WHERE o.mirror = :mirror AND o.refused IS NULL AND o.seq BETWEEN :first AND :last
      AND o.claimed_until = :until"""
"""The rows a pass holds: through its lease (its token and seq range, in the owed rows'
index), not a list of thousands of seqs."""

_HELD = sa.text(_HELD_ROWS.format(rows="outbox", joined=_BY_SEQ, held=_LEASED))
"""A pass's rows read after its claim, in the claim's transaction (SQLite: its UPDATE
cannot be a common table expression). PostgreSQL reads them in the claim's statement:
one statement and one result where there had been two (the forwarder's own process
spent a tenth less CPU: 6.4-6.7 ms per 1,000 events against 5.8-6.0, in one pair of
runs). The claim holds the forwarder's turn longer for it, which did not cost
throughput: claiming past a window found in turn, in parallel, measured no faster."""

_HELD_BY_ID = sa.text(_HELD_ROWS.format(rows="outbox", joined="e.id = o.event_id", held=_LEASED))
"""The same by id alone, for a pass the first read missed some of: rows owed without
the event's seq (by a process still on 0008) or with a wrong one."""


REFUSED_METERS = (
    sa.select(meters.c.event_name, outbox.c.refused)
    .join(meters, meters.c.id == outbox.c.event_id)
    .where(
        outbox.c.mirror == sa.bindparam("mirror"),
        outbox.c.kind == "meter",
        outbox.c.refused.is_not(None),
    )
)
"""The event names of the ledger meters a mirror refused, and why; every pass asks, so
it reads the dead letters' index (`outbox_dead`), not the whole outbox."""

OWED_LOOKED_AT = 50_000
"""Usage rows a change of a customer gone from the ledger looks through for its usage."""

_SEQ = operator.itemgetter(0)
"""A claimed row's seq."""

_usage_event = Trusted(UsageEvent)


def _built(rows: Sequence[Sequence[Any]]) -> tuple[dict[str, UsageEvent], set[str], bool]:
    """The live events of usage rows (`_HELD_ROWS`), the ids not to send, and whether a
    row's event was not found."""
    values: dict[Any, Decimal] = {}  # an exact value, and dimensions, decoded once each
    dimensions: dict[str, dict[str, str]] = {}
    live: dict[str, UsageEvent] = {}
    uncounted: set[str] = set()
    missed = False
    for _, _, event_id, name, customer, ts, value, text, not_sent in rows:
        if name is None:
            missed = True
            continue
        if not_sent:
            uncounted.add(event_id)
            continue
        amount = values.get(value)
        if amount is None:
            amount = values[value] = rules.canonical(Decimal(str(value)))
        found = dimensions.get(text)
        if found is None:
            found = dimensions[text] = json.loads(text)
        live[event_id] = _usage_event(
            {
                "id": event_id,
                "event_name": name,
                "customer_id": customer,
                "value": amount,
                "timestamp": from_epoch_micros(ts),
                "dimensions": dict(found),  # a copy each: a mirror may keep the event
            },
        )
    return live, uncounted, missed


HOUR = 3_600_000_000
"""An hour in microseconds: deliveries are kept by the UTC hour of their events' times."""


def _hour_of(event: UsageEvent) -> tuple[str, str, int]:
    return event.event_name, event.customer_id, _hour(epoch_micros(event.timestamp))


def _hour(micros: int) -> int:
    """The start of the UTC hour a time falls in (floored: times before 1970 too)."""
    return micros - micros % HOUR


def _delivered_now(dialect: str) -> Any:
    """Mark an (event name, customer, hour) delivered now; the later time wins, whichever
    forwarder writes last."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(mirror_deliveries)
    later = sa.func.greatest if dialect == "postgresql" else sa.func.max
    return statement.on_conflict_do_update(
        index_elements=["mirror", "event_name", "customer_id", "hour"],
        set_={
            "delivered_at": later(mirror_deliveries.c.delivered_at, statement.excluded.delivered_at)
        },
    )


def _delivery(settings: MeteringSettings) -> tuple[int, float, float]:
    """What of the library's settings a forwarder delivers under."""
    return settings.max_attempts, settings.retry_backoff, settings.delivery_timeout


class _Held(NamedTuple):
    """The rows one pass leased: its token (the lease's end) and their seq range."""

    mirror: str
    until: int
    first: int
    last: int

    def rows(self) -> sa.ColumnElement[bool]:
        """The rows this pass still holds (in the owed rows' partial index)."""
        return sa.and_(
            outbox.c.mirror == self.mirror,
            outbox.c.refused.is_(None),
            outbox.c.seq.between(self.first, self.last),
            outbox.c.claimed_until == self.until,
        )


class Forwarder:
    """Delivers what the outbox owes each mirror."""

    def __init__(
        self,
        transaction: Transaction,
        mirrors: Mapping[str, IMetering],
        settings: MeteringSettings | None = None,
        *,
        lease: float = LEASE,
        clock: StoreClock | None = None,
    ) -> None:
        self._transaction = transaction
        self._clock = clock or StoreClock()  # of leases and delivery marks
        self.lease = lease
        """Seconds a pass holds the rows it took (`SqlSettings.mirror_lease`)."""
        self.mirrors = dict(mirrors)
        self._settings = settings or MeteringSettings()
        self._given: MeteringSettings | None = None
        self._down: set[str] = set()
        self._failing: dict[str, str] = {}  # the change each mirror last failed on, and how
        self._forgotten: dict[str, float] = {}  # when each mirror's old deliveries go next
        self._cursor = ClaimCursor()
        self._counts = {name: collections.Counter[str]() for name in self.mirrors}

    async def forward(self, mirror: str, *, limit: int | None = None) -> int:
        """Lease up to a batch of `mirror`'s oldest rows, deliver them and mark each;
        the number settled, delivered or refused (0: nothing is owed now, or the mirror
        failed: a forwarder then rests rather than asking again at once). With young
        collections eased (nothing frozen): a pass makes a model of each of thousands
        of events, and a collection every 700 of them cost an in-process forwarder a
        seventh of its rate (`bench_mirrors`, 61-63k events/s against 72k)."""
        with eased(freeze=False):
            return await self._pass(mirror, limit)

    def deliver_with(self, settings: MeteringSettings) -> None:
        """Deliver under `settings` (the facade's attempts, backoff and timeout). Two
        facades over one provider share its forwarder, and the last one's settings hold:
        said in the log when they differ (review)."""
        if self._given is not None and _delivery(settings) != _delivery(self._given):
            logger.warning(
                "a second Metering over the same ledger: its forwarder now delivers under "
                "the newer one's settings (max_attempts=%s, retry_backoff=%s, "
                "delivery_timeout=%s)",
                settings.max_attempts,
                settings.retry_backoff,
                settings.delivery_timeout,
            )
        if settings.delivery_timeout >= self.lease * 0.8:
            logger.warning(
                "delivery_timeout=%s s leaves a mirror pass no time: a pass ends at %s s "
                "(0.8 of the mirror lease) and its rows are sent again; raise mirror_lease",
                settings.delivery_timeout,
                self.lease * 0.8,
            )
        self._settings = self._given = settings

    def owed_again(self, mirror: str) -> None:
        """Rows of `mirror` behind where claims start are owed again (dead letters
        retried): the next claim looks from the head."""
        self._cursor.restart(mirror)

    async def _pass(self, mirror: str, limit: int | None) -> int:
        provider = self.mirrors[mirror]
        try:
            capabilities = await provider.load_capabilities()
        except Exception as exc:  # the mirror cannot even say its batch size: down
            if mirror not in self._down:  # once per outage, not once per pass
                logger.warning("mirror %r is unavailable (%s); its rows wait", mirror, exc)
            self._down.add(mirror)
            return 0
        if mirror in self._down:
            self._down.discard(mirror)
            self._failing.pop(mirror, None)  # a change failing still is said again (review)
            logger.warning("mirror %r is reachable again; forwarding what it is owed", mirror)
        size = limit or capabilities.max_batch_size
        now = await self._clock.micros()
        lease = self.lease
        # The lease's end is also the pass's token, so it has a random part (under a
        # second): two passes, of this process or another, never share one.
        until = now + int(lease * 1e6) + secrets.randbelow(1_000_000)
        parameters = {"mirror": mirror, "now": now, "until": until, "limit": size, "after": 0}
        # by seq; plain rows, where an _Owed each was a tenth of a pass of 10,000 events
        # (changes, a few, get them)
        leased, changes = await self._take(parameters)
        if not leased:
            return 0
        seqs = [row[0] for row in leased]
        held = _Held(mirror, until, seqs[0], seqs[-1])
        delivered: list[int] = []
        withheld: list[int] = []  # settled unsent: see _send_usage
        refused: dict[int, str] = {}
        touched: set[tuple[str, str, int]] = set()  # what the mirror took: see _send_usage
        try:
            # Within the lease, or another forwarder could take these rows while they
            # are still being sent; what is not settled by then is taken again later.
            async with asyncio.timeout(lease * 0.8):
                if changes:
                    changed = [_Owed._make(row[:3]) for row in leased]
                    delivered, refused = await self._send_changes(mirror, provider, changed)
                else:
                    usage = [row for row in leased if row[1] == "usage"]
                    cancels = {row[2]: row[0] for row in leased if row[1] == "cancel"}
                    delayed = capabilities.processing_delay is not None
                    delivered, withheld, refused, touched = await self._send_usage(
                        held, provider, usage, touching=delayed
                    )
                    cancelled, cancel_refused = await self._send_cancels(
                        mirror, provider, cancels, touched if delayed else None
                    )
                    delivered.extend(cancelled)
                    refused.update(cancel_refused)
        except TimeoutError:
            logger.warning("mirror %r: a pass outlasted its lease; its rows are sent again", mirror)
        except Exception:
            # The store failed mid-pass (a read): the rows go back now, not when the lease
            # runs out (two minutes); if the store is down this fails too, and they wait.
            with contextlib.suppress(Exception):
                await self._settle(held, [], {}, seqs)
            self._cursor.restart(mirror)  # given back: behind the cursor
            raise
        settled = {*delivered, *withheld, *refused}
        retry = [seq for seq in seqs if seq not in settled]
        taken = {*delivered}
        superseding = [_Owed._make(row[:3]) for row in leased if changes and row[0] in taken]
        await self._settle(held, [*delivered, *withheld], refused, retry, superseding, touched)
        if touched and capabilities.processing_delay is not None:
            await self._forget_deliveries(mirror, capabilities.processing_delay)
        if retry:
            self._cursor.restart(mirror)  # given back: behind the cursor
        outcomes = (("delivered", delivered), ("withheld", withheld), ("refused", refused))
        for outcome, rows in outcomes:
            if rows:
                self._counts[mirror][outcome] += len(rows)
                _rows.add(len(rows), {"mirror": mirror, "outcome": outcome})
        return len(settled)

    async def _take(self, parameters: Mapping[str, Any]) -> tuple[Sequence[Sequence[Any]], bool]:
        """Lease the next rows, in turn with this forwarder's other passes: the meter and
        customer changes owed, if any are free, as (seq, kind, key, None); else usage and
        cancellations, from the cursor on, by seq, each usage row with its event
        (`_HELD_ROWS`). The rows, and whether they are changes."""
        mirror = parameters["mirror"]
        async with self._cursor.turn(mirror):
            async with self._transaction() as connection:
                dialect = connection.dialect.name
                if await connection.scalar(_CHANGES_OWED, parameters):
                    if dialect == "postgresql":  # one change pass at a time, however many claim
                        await connection.execute(_ONE_CHANGE_PASS, parameters)
                    changed = await rows_of(connection, _claim(dialect, True), parameters)
                    if changed:
                        return sorted(changed, key=_SEQ), True  # RETURNING has no order
                claim = _claim(dialect, False)

                async def take_from(after: int) -> Sequence[Sequence[Any]]:
                    claimed = await rows_of(connection, claim, {**parameters, "after": after})
                    if claimed and dialect != "postgresql":
                        seqs = [row[0] for row in claimed]
                        held = {"first": min(seqs), "last": max(seqs), **parameters}
                        claimed = await rows_of(connection, _HELD, held)
                    return claimed

                start = self._cursor.start(mirror, sweep=self.lease / 4)
                claimed = await take_from(start.after)
                if not claimed and start.after:  # rows given back may lie behind the cursor
                    self._cursor.restart(mirror)
                    start = self._cursor.start(mirror, sweep=self.lease / 4)
                    claimed = await take_from(0)
            if claimed:  # committed: the next claim starts past these rows
                last = claimed[-1][0]
                self._cursor.claimed(mirror, start, last, full=len(claimed) >= parameters["limit"])
            return claimed, False

    async def _send_changes(
        self, mirror: str, provider: IMetering, leased: Sequence[_Owed]
    ) -> tuple[list[int], dict[int, str]]:
        """Bring the mirror's meters and customers to the ledger's, one change at a time
        in the order they were made; the rows done and those refused. At the first the
        mirror fails (an outage, credentials, a bug: not a refusal) the pass stops, so
        none overtakes another, and the rest wait, owed, never dead letters: events
        queue behind them and show in the outbox's depth and age until it is fixed."""
        delivered: list[int] = []
        refused: dict[int, str] = {}
        for row in leased:
            try:
                await self.follow(mirror, provider, row.kind, row.event_id, after=row.seq)
            except (Refused, *REFUSALS) as exc:
                logger.warning("mirror %r refused %s %r: %s", mirror, row.kind, row.event_id, exc)
                refused[row.seq] = str(exc)
            except Exception as exc:
                failure = f"{row.kind} {row.event_id!r} ({exc})"
                if self._failing.get(mirror) != failure:  # once, not once a pass
                    logger.warning("mirror %r failed on %s; changes wait", mirror, failure)
                self._failing[mirror] = failure
                break
            else:
                delivered.append(row.seq)
                if self._failing.pop(mirror, None) is not None:
                    logger.warning("mirror %r takes changes again", mirror)
        return delivered, refused

    async def follow(
        self, mirror: str, provider: IMetering, kind: str, key: str, *, after: int = 0
    ) -> MirrorLink:
        """Make `mirror`'s meter or customer `key` what the ledger holds now (the change
        owed at outbox seq `after`, if one is)."""
        if kind == "meter":
            meter = await ledger_meter(self._transaction, key)
            return await sync_meter(self._transaction, mirror, provider, key, meter)
        customer = await ledger_customer(self._transaction, key)
        if customer is None and await self._usage_owed(mirror, key, after):
            # Offboarded before its usage reached the mirror: the mirror bills that usage
            # all the same, so it gets the customer, by its id (its fields are gone):
            # never made there, every event of it was refused for good (probe).
            customer = Customer(id=key)
        return await sync_customer(mirror, provider, key, customer)

    async def _usage_owed(self, mirror: str, customer_id: str, after: int) -> bool:
        """Whether `mirror` may still be owed usage of the customer's events: among the
        next `OWED_LOOKED_AT` usage rows after the change (those before it have gone: a
        change waits for them). Past as many, it may be: a backlog is not read whole
        (review: a statement over millions of rows outlasted the statement timeout, and
        the change, and the mirror with it, failed for good), and an empty customer made
        on the mirror costs nothing, where its usage refused would be billed nowhere."""
        next_rows = (
            sa.select(outbox.c.event_id)
            .where(
                outbox.c.mirror == mirror,
                outbox.c.seq > after,
                outbox.c.kind == "usage",
                outbox.c.refused.is_(None),
            )
            .order_by(outbox.c.seq)
            .limit(OWED_LOOKED_AT)
            .subquery()
        )
        ours = sa.case((events.c.customer_id == customer_id, 1), else_=0)
        statement = sa.select(sa.func.count(), sa.func.max(ours)).select_from(
            next_rows.outerjoin(events, events.c.id == next_rows.c.event_id)
        )
        async with self._transaction(writes=False) as connection:
            looked_at, found = (await connection.execute(statement)).one()
        return bool(found) or looked_at >= OWED_LOOKED_AT

    async def _send_usage(
        self, held: _Held, provider: IMetering, rows: Sequence[Sequence[Any]], *, touching: bool
    ) -> tuple[list[int], list[int], dict[int, str], set[tuple[str, str, int]]]:
        """Deliver the events of the usage `rows` (`_HELD_ROWS`); the rows delivered,
        those withheld (settled unsent, below), those refused (with the reason), and, if
        `touching`, the (event name, customer, UTC hour) of each event the mirror took
        (for a mirror that shows what it takes only after a processing delay).
        A row whose delivery gave up (the mirror failing, not refusing) is in neither,
        and is taken again by a later pass. An event cancelled here meanwhile, or whose
        meter was deleted and made again (`_HELD_ROWS`), is not sent (a dead letter
        retried after its cancel would count it), and an event of a
        meter the mirror refused is refused with it: sent, it would be billed by another
        aggregation, or the mirror's meter of that name might not be the ledger's."""
        owed = {row[2]: row[0] for row in rows}
        if not owed:
            return [], [], {}, set()
        live, uncounted = await self._events(held, rows)
        refused_meters = await self._refused_meters(held.mirror)
        withheld = [owed[i] for i in uncounted]  # nothing left to send
        gone = "the event is no longer in the store"
        stored = {*live, *uncounted}
        refused = {seq: gone for event_id, seq in owed.items() if event_id not in stored}
        sending: list[UsageEvent] = []
        for event in live.values():
            if event.event_name in refused_meters:
                reason = refused_meters[event.event_name]
                refused[owed[event.id]] = f"the mirror refused its meter: {reason}"
            else:
                sending.append(event)
        policy = DeliveryPolicy(provider, self._settings, durable=False)
        result = await policy.settle(sending)
        taken = [*result.accepted, *result.duplicates]
        delivered = [owed[i] for i in taken]
        for event_id, reason in result.rejected.items():
            if not reason.startswith(GAVE_UP):
                refused[owed[event_id]] = reason
        touched = {_hour_of(live[i]) for i in taken if i in live} if touching else set()
        return delivered, withheld, refused, touched

    async def _refused_meters(self, mirror: str) -> dict[str, str]:
        """Event names of the ledger meters `mirror` refused (dead letters), and why."""
        async with self._transaction(writes=False) as connection:
            found = await connection.execute(REFUSED_METERS, {"mirror": mirror})
            return {row[0]: row[1] for row in found}

    async def _send_cancels(
        self,
        mirror: str,
        provider: IMetering,
        owed: Mapping[str, int],
        touched: set[tuple[str, str, int]] | None = None,
    ) -> tuple[list[int], dict[int, str]]:
        """Cancel on the mirror, naming each event's event name (Stripe cannot cancel
        without it once the process that sent the event is gone); the rows done and
        those refused. An id the mirror had cancelled already (an answer lost, then
        asked again) is done. An id the mirror does not know is done once its event has
        reached the mirror (nothing is left to cancel), and is tried again while the
        event is still owed to it; so is every row when the mirror fails. The (event
        name, customer, hour) of each cancel the mirror took go into `touched`, if given:
        a mirror processing it reads over meanwhile."""
        if not owed:
            return [], {}
        async with self._transaction(writes=False) as connection:
            stored = {
                row[0]: (row[1], row[2], row[3])
                for row in await connection.execute(
                    sa.select(
                        events.c.id, events.c.event_name, events.c.customer_id, events.c.ts
                    ).where(events.c.id.in_(list(owed)))
                )
            }
        names = {event_id: found[0] for event_id, found in stored.items()}
        by_name: dict[str, list[str]] = {}
        for event_id in owed:
            by_name.setdefault(names.get(event_id, ""), []).append(event_id)
        # Asked before the mirror is: an event a sibling pass is delivering meanwhile may
        # land after the mirror answered "not found" and before a later look would see it
        # still owed, and its cancel would be done with the event live on the mirror.
        # Rows only ever leave the outbox, so an event not owed now had reached it.
        waiting = await self._still_owed(mirror, list(owed))
        done: list[int] = []
        refused: dict[int, str] = {}
        for name, ids in by_name.items():
            try:
                answer, failed = await self._cancel(provider, ids, name or None)
            except UnsupportedOperationError as exc:
                refused.update({owed[i]: str(exc) for i in ids})
                continue
            # done: cancelled, or unknown to a mirror its event had reached (nothing left
            # to cancel); an id with no answer (the mirror failed first) waits
            settled = {*answer.cancelled, *(set(answer.not_found) - waiting)}
            if touched is not None:
                for event_id in answer.cancelled:
                    if event_id in stored:
                        name, customer, micros = stored[event_id]
                        touched.add((name, customer, _hour(micros)))
            for event_id in ids:
                reason = answer.rejected.get(event_id)
                if reason is not None and not rules.cancelled_before(reason):
                    refused[owed[event_id]] = reason
                elif reason is not None or event_id in settled:
                    done.append(owed[event_id])
            if failed:
                break  # the mirror failing: the rest wait
        return done, refused

    @staticmethod
    async def _cancel(
        provider: IMetering, ids: Sequence[str], event_name: str | None
    ) -> tuple[CancelResult, bool]:
        """Cancel `ids` on the mirror; if that fails, one at a time until the mirror
        fails again. A provider that cancels id by id (Stripe: a request each) loses what
        it did to a failure at the last id, and at a high failure rate would never finish
        a batch; here what was answered before a failure is kept, and an id the mirror
        refuses for good is rejected with its reason (a dead letter) rather than holding
        the rest. The answers, and whether the mirror failed (an outage costs two calls
        a pass, not one per id)."""
        try:
            return await provider.cancel_usage_events(ids, event_name=event_name), False
        except UnsupportedOperationError:
            raise
        except Exception:
            pass  # one at a time, below
        answered = CancelResult()
        for event_id in ids:
            try:
                one = await provider.cancel_usage_events([event_id], event_name=event_name)
            except UnsupportedOperationError:
                raise
            except REFUSALS as exc:
                answered.rejected[event_id] = str(exc)
                continue
            except Exception:
                return answered, True
            answered.cancelled.extend(one.cancelled)
            answered.not_found.extend(one.not_found)
            answered.rejected.update(one.rejected)
        return answered, False

    async def _events(
        self, held: _Held, rows: Sequence[Sequence[Any]]
    ) -> tuple[dict[str, UsageEvent], set[str]]:
        """The live events of the usage `rows` this pass holds; and the ids not to send:
        cancelled, or of a meter deleted and made again. A row whose event was not found
        by its seq has them all read again by id."""
        live, uncounted, missed = _built(rows)
        if missed:
            parameters = {"mirror": held.mirror, "first": held.first, "last": held.last}
            parameters["until"] = held.until
            async with self._transaction(writes=False) as connection:
                again = await rows_of(connection, _HELD_BY_ID, parameters, alone=True)
            live, uncounted, _ = _built([row for row in again if row[1] == "usage"])
        return live, uncounted

    async def _still_owed(self, mirror: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        async with self._transaction(writes=False) as connection:
            return set(
                await connection.scalars(
                    sa.select(outbox.c.event_id).where(
                        outbox.c.mirror == mirror,
                        outbox.c.kind == "usage",
                        outbox.c.event_id.in_(list(ids)),
                        outbox.c.refused.is_(None),
                    )
                )
            )

    async def _settle(
        self,
        held: _Held,
        delivered: Sequence[int],
        refused: Mapping[int, str],
        retry: Sequence[int],
        superseding: Sequence[_Owed] = (),
        touched: Collection[tuple[str, str, int]] = (),
    ) -> None:
        """Mark what happened to each leased row, and release those to try again; only
        rows this pass still holds (its lease): a row another forwarder took after the
        lease ran out is that forwarder's to mark. The rows still held after that are
        the ones delivered, deleted through the lease rather than a list of seqs. The
        (event name, customer, hour) the mirror took events of, if `touched`, are marked
        delivered now in the same transaction, for reconcile: their cells are not repaired
        while the mirror may still be processing them."""
        now = await self._clock.micros()  # before a connection is held: it may take one
        async with self._transaction() as connection:
            if touched:
                await connection.execute(
                    _delivered_now(connection.dialect.name),
                    [
                        {"mirror": held.mirror, "event_name": name, "customer_id": customer}
                        | {"hour": hour, "delivered_at": now}
                        for name, customer, hour in sorted(touched)  # locks in one order
                    ],
                )
            for seq, reason in refused.items():
                await connection.execute(
                    sa.update(outbox)
                    .where(outbox.c.seq == seq, outbox.c.claimed_until == held.until)
                    .values(refused=reason, claimed_until=None)
                )
            if retry:
                await connection.execute(
                    sa.update(outbox)
                    .where(outbox.c.seq.in_(list(retry)), held.rows())
                    .values(claimed_until=None)
                )
            if delivered:
                await connection.execute(sa.delete(outbox).where(held.rows()))
            for change in superseding:
                # The mirror took this change, so its meter or customer is what the ledger
                # holds: an earlier change of it the mirror refused (a dead letter) is moot,
                # and would hold back that meter's events for good.
                await connection.execute(
                    sa.delete(outbox).where(
                        outbox.c.mirror == held.mirror,
                        outbox.c.kind == change.kind,
                        outbox.c.event_id == change.event_id,
                        outbox.c.refused.is_not(None),
                        outbox.c.seq < change.seq,
                    )
                )

    async def _forget_deliveries(self, mirror: str, delay: timedelta) -> None:
        """Drop the deliveries marked over three times the delay ago, at most once per
        quarter of the delay, in a transaction of its own, as housekeeping (one failing
        is tried again later). Reconcile asks for those since the delay before it asked
        the mirror, and a mirror asked customer by customer may take long to answer:
        two delays more of slack (review). On PostgreSQL the marks are locked in key
        order, skipping those a settling pass holds: in the order of their times, as a
        plain DELETE takes them, the purge and a pass's upsert deadlocked (review)."""
        now = time.monotonic()
        if now < self._forgotten.get(mirror, 0.0):
            return
        self._forgotten[mirror] = now + delay.total_seconds() / 4
        old = await self._clock.micros() - 3 * int(delay.total_seconds() * 1e6)
        marks = mirror_deliveries.c
        stale = sa.and_(marks.mirror == mirror, marks.delivered_at < old)
        with contextlib.suppress(Exception):
            async with self._transaction() as connection:
                if connection.dialect.name == "postgresql":
                    key = (marks.mirror, marks.event_name, marks.customer_id, marks.hour)
                    free = (
                        sa.select(*key)
                        .where(stale)
                        .order_by(*key)
                        .with_for_update(skip_locked=True)
                    )
                    stale = sa.tuple_(*key).in_(free)
                await connection.execute(sa.delete(mirror_deliveries).where(stale))

    def count_reported(self, mirror: str, count: int) -> None:
        """Events `mirror` reported refusing after it accepted them (a notice)."""
        self._counts[mirror]["reported"] += count
        _rows.add(count, {"mirror": mirror, "outcome": "reported"})

    async def forward_all(self) -> int:
        """Forward until nothing more is owed (or a mirror fails): `PASSES` passes at a
        time per mirror, each taking the next rows as soon as it is done (their leases
        never overlap), so a mirror's latency and the store's work overlap as the
        pipeline's batches in flight do; the rows settled. If a pass fails (the store),
        the others end after the pass they are in (cancelled mid-send, they would leave
        what the mirror took leased until the lease ran out) and the failure is raised."""
        passes = _Passes(self.forward)

        async def drain(mirror: str) -> int:
            settled = 0
            try:
                while not passes.stopping:
                    moved = await passes.one(mirror)
                    settled += moved
                    if not moved and not await passes.after_progress(mirror):
                        break
            except Exception:
                passes.stopping = True
                raise
            return settled

        done = await asyncio.gather(
            *(drain(name) for name in self.mirrors for _ in range(PASSES)),
            return_exceptions=True,
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(outcome for outcome in done if isinstance(outcome, int))

    async def run(self, idle: float = IDLE) -> None:
        """Forward until cancelled: `PASSES` passes at a time per mirror, each resting
        `idle` seconds whenever it found nothing to do, so a mirror that is down or idle
        is asked again every `idle` seconds however busy another keeps the forwarder. A
        failure (the store down) is logged once per mirror and waited out: the outbox
        keeps everything."""
        passes = _Passes(self.forward)
        failing: set[str] = set()

        async def keep_forwarding(mirror: str) -> None:
            this = asyncio.current_task()
            while True:
                if this is not None and this.cancelling():
                    # cancelled, and a mirror made an error or an answer of it: the task
                    # group cancels each pass once, so the pass ends here all the same
                    raise asyncio.CancelledError
                try:
                    moved = await passes.one(mirror)
                except Exception:
                    if mirror not in failing:  # once, until a pass of it succeeds
                        logger.exception(
                            "forwarding to %r failed; trying again every %s s", mirror, idle
                        )
                    failing.add(mirror)
                    await asyncio.sleep(idle)
                    continue
                failing.discard(mirror)
                if not moved and not await passes.after_progress(mirror):
                    await asyncio.sleep(idle)

        # A task group, not gather: cancelled, gather ends as soon as its first pass has,
        # and the others finished their cleanup (a rollback, a connection SQLAlchemy was
        # closing) after the caller had gone on to close the store, where one could hang.
        async with asyncio.TaskGroup() as passes_running:
            for name in self.mirrors:
                for _ in range(PASSES):
                    passes_running.create_task(keep_forwarding(name))

    async def status(self) -> list[MirrorStatus]:
        """Each mirror's depth, oldest undelivered age and dead letters."""
        unsettled = outbox.c.refused.is_(None)  # delivered rows are deleted
        statement = (
            sa.select(
                outbox.c.mirror,
                sa.func.count().filter(unsettled),
                sa.func.min(outbox.c.created_at).filter(unsettled),
                sa.func.count().filter(outbox.c.refused.is_not(None)),
            )
            .where(outbox.c.mirror.in_(list(self.mirrors)))
            .group_by(outbox.c.mirror)
        )
        async with self._transaction(writes=False) as connection:
            found = {row[0]: row[1:] for row in await connection.execute(statement)}
        now = time.time()
        statuses = []
        for name, provider in self.mirrors.items():
            depth, oldest, dead = found.get(name, (0, None, 0))
            statuses.append(
                MirrorStatus(
                    mirror=name,
                    provider=provider.name,
                    depth=depth,
                    oldest_seconds=None if oldest is None else max(0.0, now - oldest / 1e6),
                    dead_letters=dead,
                    delivered=self._counts[name]["delivered"],
                    refused=self._counts[name]["refused"],
                    reported=self._counts[name]["reported"],
                    withheld=self._counts[name]["withheld"],
                )
            )
        return statuses


class _Passes:
    """A forwarder's passes over each mirror, at once. One that finds nothing to take
    while a sibling is mid-pass waits for it rather than stopping or resting: the
    sibling may be delivering the meter change every event waits behind, or leave rows
    to try again. (Stopped, three of four passes ended at the first change and one
    drained the outbox alone: the mirror's time and the store's were spent in turn.)"""

    def __init__(self, forward: Callable[[str], Awaitable[int]]) -> None:
        self._forward = forward
        self._busy = collections.Counter[str]()
        self._next: dict[str, asyncio.Future[bool]] = {}
        self.stopping = False
        """Set when a pass failed: the others end after the pass they are in."""

    async def one(self, mirror: str) -> int:
        """A pass; the rows it settled. The passes waiting are told when one settles
        rows (there may be more to take) and when the last finishes (there is nothing
        to wait for), not at each that found nothing or failed: they would wake one
        another for as long as one pass is sending, or hammer a store that is down."""
        self._busy[mirror] += 1
        moved = 0
        try:
            moved = await self._forward(mirror)
            return moved
        finally:
            self._busy[mirror] -= 1
            if moved or not self._busy[mirror]:
                told = self._next.pop(mirror, None)
                if told is not None and not told.done():
                    told.set_result(moved > 0)

    async def after_progress(self, mirror: str) -> bool:
        """Whether, waiting while a sibling was mid-pass, one settled rows (False at
        once when none is mid-pass)."""
        if not self._busy[mirror]:
            return False
        told = self._next.setdefault(mirror, asyncio.get_running_loop().create_future())
        return await asyncio.shield(told)  # one waiter cancelled must not cancel the rest
