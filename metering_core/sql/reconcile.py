"""Reconcile: prove a mirror holds what the ledger holds, meter by customer by window.

Both sides are asked the same question (the meter's aggregation over the same windows,
per customer), and each cell is compared exactly: equal, short (the mirror would
invoice less), over (more), pending (different, while the ledger still owes the mirror
events of that cell, or delivered some within the mirror's processing delay:
`Capabilities.processing_delay`), or not comparable (the mirror cannot answer: a window, an
aggregation or a meter it does not have, or a meter of another aggregation). A mirror
that answers one customer at a time is asked for each customer the ledger has events of,
so usage of a customer the ledger never saw is visible only on mirrors that group by
customer. Nothing is guessed: a cell either side does
not answer is 0 for sum and count, and absent for the others.

Repair sends, for each short cell of a sum or count meter, the difference to the mirror as
correction events whose ids derive from the cell and both totals (a repair interrupted
and run again sends the same ids, which the mirror answers duplicate), recorded before
it is sent: a cell overlapping a recent repair is pending, not repaired again (see
`_Repairs`, `_record`), and the events it holds are not sent again (`held_by_repair`). An
over-count, or a cell of another aggregation, is reported and left alone: taking usage
away, or guessing what a max was, is not a correction a store can prove right.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from metering_core.config import MeteringSettings
from metering_core.delivery import GAVE_UP, DeliveryPolicy
from metering_core.epoch import epoch_micros
from metering_core.errors import NotFoundError, UnsupportedOperationError, ValidationError
from metering_core.interface import Capabilities, IMetering
from metering_core.models import (
    EXACT,
    Aggregation,
    CellStatus,
    Meter,
    ReconcileCell,
    ReconcileReport,
    UsageEvent,
    UsageQuery,
    Window,
)
from metering_core.sql.mirrors import HOUR
from metering_core.sql.rows import Transaction
from metering_core.sql.schema import (
    events,
    meters,
    mirror_deliveries,
    mirror_meters,
    mirror_repairs,
    outbox,
)
from metering_core.sql.store_clock import StoreClock

__all__ = ["DRIFT", "REPAIR_SETTLE", "held_by_repair", "one_repair_at_a_time", "reconcile"]

logger = logging.getLogger("metering")

Key = tuple[str, datetime]  # customer, window start
_ZERO_WHEN_ABSENT = (Aggregation.SUM, Aggregation.COUNT)

DRIFT = frozenset({CellStatus.short, CellStatus.over, CellStatus.refused})
"""Cell statuses that make a report not ok."""

REPAIR_SETTLE = timedelta(hours=1)
"""How long a repaired cell is `pending` and not repaired again: the mirror may not show
the correction yet (Stripe takes minutes), and a second one would count it twice. A
mirror's longer processing delay stands instead (`_settling`)."""


def _settling(capabilities: Capabilities) -> timedelta:
    return max(REPAIR_SETTLE, capabilities.processing_delay or REPAIR_SETTLE)


_LONGEST_WINDOW = timedelta(days=31)

FLOAT_SUM_AGREEMENT = Decimal("1e-9")
"""The relative difference within which a sum of a mirror that sums in floating point
(`Capabilities.exact_sums` false: Stripe) agrees with the ledger's exact one. A float
sum of n values is within about n x 1.1e-16 of theirs, so this holds to ten million
events a cell (1,000 of 0.01 read 9.99999999999983 there); an event lost is its whole
value, far more for any meter that bills money. Whole sums a float holds exactly are
compared exactly (`_close`)."""

ASKED_AT_ONCE = 8
"""Customers a mirror that answers one at a time (Stripe) is asked about at once: its
round trips overlap, within what its rate limits allow."""


def _chosen(meters: Sequence[Meter], meter_ids: Sequence[str] | None) -> list[Meter]:
    """The ledger's meters to compare: all, or those `meter_ids` names, each of which must
    be one (a report of nothing, ok, would prove nothing)."""
    if meter_ids is None:
        return list(meters)
    known = {meter.id for meter in meters}
    unknown = [meter_id for meter_id in meter_ids if meter_id not in known]
    if unknown or not meter_ids:
        raise ValidationError(
            f"meter_ids={list(meter_ids)!r}: "
            + (f"no meter of the ledger has the id {unknown[0]!r}" if unknown else "names none"),
            field="meter_ids",
            value=list(meter_ids),
        )
    return [meter for meter in meters if meter.id in meter_ids]


async def _meters(provider: IMetering) -> list[Meter]:
    found: list[Meter] = []
    cursor = None
    while True:
        page = await provider.fetch_all_meters(limit=100, cursor=cursor)
        found.extend(page.items)
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


async def _usage(
    provider: IMetering, query: UsageQuery, customers: Collection[str], grouped: bool
) -> dict[Key, tuple[datetime, Decimal]]:
    """Each (customer, window start): the window's end and value. One query grouped by
    customer where the provider groups, else one per customer."""
    answered: dict[Key, tuple[datetime, Decimal]] = {}
    if grouped:
        usage = await provider.fetch_usage(query.model_copy(update={"group_by": ("customer_id",)}))
        for row in usage.rows:
            answered[(row.customer_id or "", row.start)] = (row.end, row.value)
        return answered
    turns = asyncio.Semaphore(ASKED_AT_ONCE)

    async def ask(customer: str) -> None:
        async with turns:
            try:
                usage = await provider.fetch_usage(
                    query.model_copy(update={"customer_id": customer})
                )
            except NotFoundError:  # no such customer there: it bills that customer nothing
                return  # (one failing the whole reconcile hid every other's cells: probe)
        for row in usage.rows:
            answered[(customer, row.start)] = (row.end, row.value)

    asking = [asyncio.ensure_future(ask(customer)) for customer in sorted(customers)]
    try:
        await asyncio.gather(*asking)
    except BaseException:  # one failed: the others stop, rather than run on unawaited
        for task in asking:
            task.cancel()
        await asyncio.gather(*asking, return_exceptions=True)
        raise
    return answered


async def _unsent(
    transaction: Transaction,
    mirror: str,
    meter: Meter,
    start: datetime,
    end: datetime,
) -> list[tuple[str, int, bool]]:
    """(customer, time, refused) of the meter's events in range whose usage the
    ledger has not delivered to `mirror` (still owed, or refused by it: its dead letters),
    or whose cancellation it still owes it. Read after the ledger's totals and before
    the mirror is asked: an event the totals count that is not owed now had reached the
    mirror before it was asked. (Read first, an event stored in between was counted, not
    seen owed, and repaired as lost; then the forwarder delivered it too: probe.) The
    meter's, not its event name's: a deleted meter's dead letters are not a cell's of the
    meter made again with its name (probe). The meter is told in the answer, not in the
    condition: the events' index by meter and time drew PostgreSQL, before a freshly
    loaded table's statistics, to scan the outbox once per event (2.5 s became 7 s)."""
    statement = (
        sa.select(
            events.c.customer_id,
            events.c.ts,
            outbox.c.refused.is_not(None),
            events.c.meter_seq == _meter_seq(meter.id),
        )
        .join(outbox, outbox.c.event_id == events.c.id)
        .where(
            outbox.c.mirror == mirror,
            # a cancellation owed makes its cell pending; one refused (Stripe cannot cancel
            # after 24 h) leaves the mirror over, which is what it bills
            (outbox.c.kind == "usage") | ((outbox.c.kind == "cancel") & outbox.c.refused.is_(None)),
            events.c.event_name == meter.event_name,
            events.c.ts >= epoch_micros(start),
            events.c.ts < epoch_micros(end),
        )
    )
    async with transaction(writes=False) as connection:
        rows = await connection.execute(statement)
        return [(row[0], row[1], bool(row[2])) for row in rows if row[3]]


class _Theirs:
    """The mirror's meters, and which of them the ledger's meters are linked to."""

    def __init__(self, transaction: Transaction, name: str, mirror: IMetering) -> None:
        self._transaction, self._name, self._mirror = transaction, name, mirror
        self._by_id: dict[str, Meter] = {}
        self._by_name: dict[str, Meter] = {}
        self._links: dict[str, str] = {}

    async def read(self) -> None:
        """The links, then the mirror's meters: a meter a link read here names was made
        before the listing, so one the listing lacks is gone from the mirror."""
        linked = sa.select(mirror_meters.c.meter_id, mirror_meters.c.mirror_meter_id).where(
            mirror_meters.c.mirror == self._name
        )
        async with self._transaction(writes=False) as connection:
            self._links = {ours: theirs for ours, theirs in await connection.execute(linked)}
        found = await _meters(self._mirror)
        self._by_id = {m.id: m for m in found}
        self._by_name = {m.event_name: m for m in found}

    async def linked_since(self, meter: Meter) -> bool:
        """Whether `meter`'s link changed since they were read: the forwarder made it on
        the mirror meanwhile (review: called billed nowhere, short and exit 1). Asked of
        the ledger's own table, so a mirror lacking many meters is listed once, not once
        per meter (Stripe: pages of requests each)."""
        statement = sa.select(mirror_meters.c.mirror_meter_id).where(
            mirror_meters.c.mirror == self._name, mirror_meters.c.meter_id == meter.id
        )
        async with self._transaction(writes=False) as connection:
            now = await connection.scalar(statement)
        return bool(now != self._links.get(meter.id))

    def of(self, meter: Meter) -> tuple[str | None, Meter | None]:
        """The link of a ledger meter, and the mirror's meter it names: linked, or (never
        linked) the one of its event name."""
        link = self._links.get(meter.id)
        return link, self._by_id.get(link) if link else self._by_name.get(meter.event_name)

    def named(self, event_name: str) -> bool:
        """Whether the mirror has a meter of `event_name`."""
        return event_name in self._by_name


class _Counted(NamedTuple):
    """When a meter's totals were read, and the highest event seq stored after the read:
    every event they hold is at or below it (one stored just after may be too: held by a
    repair and not in it, its cell shows short, and is repaired after the hour)."""

    at: datetime
    through: int


async def _last_seq(transaction: Transaction) -> int:
    async with transaction(writes=False) as connection:
        return int(await connection.scalar(sa.select(sa.func.max(events.c.seq))) or 0)


class _Repair(NamedTuple):
    start: int
    end: int
    sent_at: int


class _Repairs:
    """The repairs sent to a mirror's cells, by meter and customer: a cell overlapping
    one sent lately is pending (the mirror may not show it yet: Stripe takes minutes).
    Whether a cell is repaired again is decided as its repair is recorded (`_record`)."""

    def __init__(
        self, found: dict[tuple[str, str], list[_Repair]], now: datetime, settle: timedelta
    ) -> None:
        self._found = found
        self._lately = epoch_micros(now - settle)

    def lately(self, meter: str, customer: str, start: datetime, end: datetime) -> bool:
        since, until = epoch_micros(start), epoch_micros(end)
        return any(
            r.start < until and r.end > since and r.sent_at >= self._lately
            for r in self._found.get((meter, customer), [])
        )


def held_by_repair(mirror: str) -> sa.Exists:
    """Whether the enclosing query's event (a row of `events`) lies in a cell a repair
    sent `mirror` the difference of, and was stored when that repair read the ledger's
    total (its seq at most `counted_through`): the correction holds it, and the event
    sent as well (a dead letter retried, a backfill) would count it twice. An event
    stored after is not in it, and is sent. (A repair recorded before 0008 holds what
    was stored before it was sent.)"""
    counted = sa.case(
        (
            mirror_repairs.c.counted_through.is_not(None),
            events.c.seq <= mirror_repairs.c.counted_through,
        ),
        else_=events.c.ingested_at.is_(None) | (events.c.ingested_at < mirror_repairs.c.sent_at),
    )
    return sa.exists(
        sa.select(1)
        .select_from(mirror_repairs.join(meters, meters.c.id == mirror_repairs.c.meter_id))
        .where(
            mirror_repairs.c.mirror == mirror,
            meters.c.seq == events.c.meter_seq,
            mirror_repairs.c.customer_id == events.c.customer_id,
            events.c.ts >= mirror_repairs.c.window_start,
            events.c.ts < mirror_repairs.c.window_end,
            counted,
        )
    )


async def _repairs(
    transaction: Transaction,
    mirror: str,
    start: datetime,
    end: datetime,
    settle: timedelta,
    clock: StoreClock,
) -> _Repairs:
    statement = sa.select(
        mirror_repairs.c.meter_id,
        mirror_repairs.c.customer_id,
        mirror_repairs.c.window_start,
        mirror_repairs.c.window_end,
        mirror_repairs.c.sent_at,
    ).where(
        mirror_repairs.c.mirror == mirror,
        mirror_repairs.c.window_start >= epoch_micros(start - _LONGEST_WINDOW),
        mirror_repairs.c.window_start < epoch_micros(end),
    )
    found: dict[tuple[str, str], list[_Repair]] = {}
    async with transaction(writes=False) as connection:
        for meter, customer, since, until, sent_at in await connection.execute(statement):
            found.setdefault((meter, customer), []).append(_Repair(since, until, sent_at))
    return _Repairs(found, await clock.now(), settle)


class _Processing:
    """The UTC hours, by customer, of the events of one meter delivered to a mirror within
    its processing delay of when it was asked: a window that touches one may not show
    them there yet."""

    def __init__(self, hours: dict[str, list[int]]) -> None:
        self.hours = hours

    def touches(self, customer: str, start: datetime, end: datetime) -> bool:
        hours = self.hours.get(customer)
        if not hours:
            return False
        first = bisect.bisect_right(hours, epoch_micros(start) - HOUR)  # ends after start
        return first < len(hours) and hours[first] < epoch_micros(end)


async def _processing(
    transaction: Transaction,
    mirror: str,
    event_name: str,
    window: tuple[datetime, datetime],
    asked: datetime,
    delay: timedelta | None,
) -> _Processing:
    """Read after the mirror answered, of deliveries since `delay` before it was `asked`:
    one marked before then it may show or not yet; one marked after was still owed when
    `_unsent` read, so its cell is pending anyway."""
    if delay is None:
        return _Processing({})
    start, end = window
    statement = sa.select(mirror_deliveries.c.customer_id, mirror_deliveries.c.hour).where(
        mirror_deliveries.c.mirror == mirror,
        mirror_deliveries.c.event_name == event_name,
        mirror_deliveries.c.hour > epoch_micros(start) - HOUR,
        mirror_deliveries.c.hour < epoch_micros(end),
        mirror_deliveries.c.delivered_at >= epoch_micros(asked - delay),
    )
    hours: dict[str, list[int]] = {}
    async with transaction(writes=False) as connection:
        for customer, hour in await connection.execute(statement):
            hours.setdefault(customer, []).append(hour)
    for found in hours.values():
        found.sort()
    return _Processing(hours)


class _Times:
    """Sorted times of one customer's unsent events: is any inside a window?"""

    def __init__(self) -> None:
        self.times: list[int] = []

    def within(self, start: datetime, end: datetime) -> bool:
        first = bisect.bisect_left(self.times, epoch_micros(start))
        return first < len(self.times) and self.times[first] < epoch_micros(end)


async def _customers(
    transaction: Transaction, event_name: str, start: datetime, end: datetime
) -> set[str]:
    """Every customer the ledger has events of the event name of, of any meter it had:
    the mirror's meter may bill any of them (an event of a deleted meter, sent before the
    ledger's meter was made again, shows `over`, as on a mirror that groups)."""
    statement = (
        sa.select(events.c.customer_id)
        .distinct()
        .where(
            events.c.event_name == event_name,
            events.c.ts >= epoch_micros(start),
            events.c.ts < epoch_micros(end),
        )
    )
    async with transaction(writes=False) as connection:
        return set(await connection.scalars(statement))


_WHOLE_AND_EXACT = Decimal(2**53)
"""Whole sums below this a float holds exactly (and sums of whole values, exactly)."""


def _close(ledger: Decimal | None, mirror: Decimal | None) -> bool:
    """Within `FLOAT_SUM_AGREEMENT` of each other, unless both are whole numbers a float
    holds exactly: then a difference is events, not rounding (probe: 3,000 bytes lost of
    4e12 were within the relative margin, and read equal)."""
    if ledger is None or mirror is None:
        return False
    largest = max(abs(ledger), abs(mirror))
    if _whole(ledger) and _whole(mirror) and largest < _WHOLE_AND_EXACT:
        return False
    return abs(ledger - mirror) <= FLOAT_SUM_AGREEMENT * largest


def _whole(value: Decimal) -> bool:
    return value == value.to_integral_value()


def _status(
    aggregation: Aggregation,
    ledger: Decimal | None,
    mirror: Decimal | None,
    *,
    refused: bool,
    pending: bool,
    exact: bool,
) -> CellStatus:
    if aggregation in _ZERO_WHEN_ABSENT:
        ledger, mirror = ledger or Decimal(0), mirror or Decimal(0)
    if ledger == mirror or (
        not exact and aggregation is Aggregation.SUM and _close(ledger, mirror)
    ):
        return CellStatus.equal
    if refused:
        return CellStatus.refused
    if pending:
        return CellStatus.pending
    if ledger is None or mirror is None:
        return CellStatus.over if ledger is None else CellStatus.short
    return CellStatus.short if mirror < ledger else CellStatus.over


async def reconcile(
    ledger: IMetering,
    transaction: Transaction,
    mirror_name: str,
    mirror: IMetering,
    clock: StoreClock,
    *,
    start: datetime,
    end: datetime,
    window: Window = Window.DAY,
    meter_ids: Sequence[str] | None = None,
    repair: bool = False,
) -> ReconcileReport:
    """Compare every (meter, customer, window) of the ledger with `mirror`'s; with
    `repair`, send each short sum or count cell its correction."""
    mine = _chosen(await _meters(ledger), meter_ids)
    theirs = _Theirs(transaction, mirror_name, mirror)
    await theirs.read()
    capabilities = await mirror.load_capabilities()
    repaired = await _repairs(transaction, mirror_name, start, end, _settling(capabilities), clock)
    cells: list[ReconcileCell] = []
    counted: dict[str, _Counted] = {}
    unbilled: set[str] = set()  # meters the mirror has none of, and is not owed
    for meter in mine:
        query = UsageQuery(meter_id=meter.id, start=start, end=end, window=window)
        at = await clock.now()
        ours = await _usage(ledger, query, (), grouped=True)
        counted[meter.id] = _Counted(at, await _last_seq(transaction))
        # A mirror asked one customer at a time is asked for every customer the ledger
        # has events of in range, cancelled ones too: all cancelled here may be billed there.
        customers = await _customers(transaction, meter.event_name, start, end)
        link, counterpart = theirs.of(meter)
        unsent = await _unsent(transaction, mirror_name, meter, start, end)
        waiting: dict[tuple[str, bool], _Times] = {}
        for customer, ts, refused in unsent:
            waiting.setdefault((customer, refused), _Times()).times.append(ts)
        for times in waiting.values():
            times.times.sort()
        making_owed = (
            link is None
            and counterpart is None
            and await _change_owed(transaction, mirror_name, meter)
        )
        if (
            counterpart is None
            and not making_owed
            and meter.aggregation in capabilities.aggregations  # else no meter can be made
        ):
            if await theirs.linked_since(meter):  # not owed now: made there meanwhile
                await theirs.read()
                link, counterpart = theirs.of(meter)
            if counterpart is None and not theirs.named(meter.event_name):
                cells.extend(_billed_nowhere(meter, ours, waiting))
                unbilled.add(meter.id)
                continue
        comparable = (
            counterpart is not None
            and counterpart.aggregation == meter.aggregation  # else equal is a coincidence
            and counterpart.unique_dimension == meter.unique_dimension
            and window in capabilities.windows
            and meter.aggregation in capabilities.aggregations
        )
        if not comparable or counterpart is None:
            # the mirror has no meter of it yet, its making still owed: its cells are on
            # their way (if the mirror can answer them at all)
            arriving = (
                making_owed
                and window in capabilities.windows
                and meter.aggregation in capabilities.aggregations
            )
            cells.extend(_not_comparable(meter, ours, waiting, arriving=arriving))
            continue
        asked = query.model_copy(update={"meter_id": counterpart.id})
        grouped = capabilities.group_by and not capabilities.requires_customer
        asked_at = await clock.now()
        try:
            answered = await _usage(mirror, asked, customers, grouped)
        except UnsupportedOperationError:  # a query it cannot answer
            cells.extend(_not_comparable(meter, ours, waiting, arriving=False))
            continue
        except ValidationError as exc:  # this range (unaligned, too long): the caller's to fix
            # not cells "not comparable" in a report that is ok: drift there went unseen
            raise ValidationError(
                f"mirror {mirror_name!r} cannot answer meter {meter.event_name!r} over this "
                f"range: {exc}",
                field=exc.field,
                value=exc.value,
            ) from exc
        # Read again: a cancellation that reached the mirror after the totals were read
        # left it short of a total that no longer holds, and was repaired back (review).
        # A cell whose total moved meanwhile is pending.
        again = await _usage(ledger, query, (), grouped=True)
        moved = {key for key in {*ours, *again} if ours.get(key) != again.get(key)}
        processing = await _processing(
            transaction,
            mirror_name,
            meter.event_name,
            (start, end),
            asked_at,
            capabilities.processing_delay,
        )
        none = _Times()
        for key in sorted({*ours, *answered}):
            window_end, ledger_value = ours.get(key, (None, None))
            mirror_end, mirror_value = answered.get(key, (None, None))
            closes = window_end or mirror_end
            assert closes is not None
            status = _status(
                meter.aggregation,
                ledger_value,
                mirror_value,
                exact=capabilities.exact_sums,
                refused=waiting.get((key[0], True), none).within(key[1], closes),
                pending=key in moved
                or waiting.get((key[0], False), none).within(key[1], closes)
                or repaired.lately(meter.id, key[0], key[1], closes)
                or processing.touches(key[0], key[1], closes),
            )
            cells.append(
                ReconcileCell(
                    meter_id=meter.id,
                    event_name=meter.event_name,
                    customer_id=key[0],
                    start=key[1],
                    end=closes,
                    ledger=ledger_value,
                    mirror=mirror_value,
                    status=status,
                )
            )
    ok = not any(c.status in DRIFT for c in cells)
    if repair and not ok:
        repairable = [meter for meter in mine if meter.id not in unbilled]
        cells = await _repair(
            transaction, mirror_name, mirror, capabilities, repairable, cells, counted, clock
        )
    return ReconcileReport(mirror=mirror_name, ok=ok, cells=cells)


def _corrections(
    meter: Meter, cell: ReconcileCell, at: datetime, newest: int | None
) -> list[UsageEvent]:
    """The events that bring a short cell up to the ledger's total, with ids derived from
    the cell, both totals and the newest event the ledger stored in it: the same drift
    of the same events gives the same ids, and a later loss gives new ones, even to the
    same totals (probe: an event cancelled and another lost gave the first repair's ids,
    the mirror answered duplicate, and the cell was marked repaired and stayed short)."""
    assert cell.ledger is not None
    missing = _difference(cell)
    key = f"{meter.id}|{cell.customer_id}|{cell.start.isoformat()}|{cell.end.isoformat()}"
    drift = f"{key}|{cell.ledger}|{cell.mirror}|{newest}"
    digest = hashlib.sha256(drift.encode()).hexdigest()[:40]

    def correction(suffix: str, value: Decimal) -> UsageEvent:
        return UsageEvent(
            id=f"reconcile-{digest}{suffix}",
            event_name=meter.event_name,
            customer_id=cell.customer_id,
            value=value,
            timestamp=at,
        )

    if meter.aggregation is Aggregation.SUM:
        if missing <= LARGEST_CORRECTION:
            return [correction("", missing)]
        with localcontext(EXACT):
            whole, rest = divmod(missing, LARGEST_CORRECTION)
        parts = [LARGEST_CORRECTION] * int(whole) + ([rest] if rest else [])
        return [correction(f"-part{n}", value) for n, value in enumerate(parts)]
    return [correction(f"-{n}", Decimal(1)) for n in range(int(missing))]


LARGEST_CORRECTION = Decimal(10**20 - 1)
"""The most one correction event carries: an event's value has at most 20 digits before
the point, and a cell's shortfall (many events' values) may have more; it is sent in
parts of this (probe: one event of 2e20 failed validation, and the whole repair with
it)."""

_PLACES = Decimal(1).scaleb(-18)
"""The places an event's value has at most."""


def _difference(cell: ReconcileCell) -> Decimal:
    """What the mirror lacks of the ledger's total, exact however many digits, to the
    places an event carries: a float-summing mirror's total read to 15 significant
    digits may have more (1 - 1.23456789012345E-10), and an exact one never has."""
    with localcontext(EXACT):
        missing = (cell.ledger or Decimal(0)) - (cell.mirror or Decimal(0))
        if int(missing.as_tuple().exponent) < -18:
            missing = missing.quantize(_PLACES, rounding=ROUND_HALF_EVEN)
        return missing


async def _change_owed(transaction: Transaction, mirror: str, meter: Meter) -> bool:
    """Whether the ledger still owes `mirror` a change of `meter` (its making, first)."""
    statement = sa.select(
        sa.exists().where(
            outbox.c.mirror == mirror,
            outbox.c.kind == "meter",
            outbox.c.event_id == meter.id,
            outbox.c.refused.is_(None),
        )
    )
    async with transaction(writes=False) as connection:
        return bool(await connection.scalar(statement))


def _meter_seq(meter_id: str) -> sa.ScalarSelect[int]:
    return sa.select(meters.c.seq).where(meters.c.id == meter_id).scalar_subquery()


async def _newest_event(transaction: Transaction, cell: ReconcileCell) -> int | None:
    """The seq of the newest event the ledger stored in a cell, cancelled ones too."""
    statement = sa.select(sa.func.max(events.c.seq)).where(
        events.c.meter_seq == _meter_seq(cell.meter_id),
        events.c.customer_id == cell.customer_id,
        events.c.ts >= epoch_micros(cell.start),
        events.c.ts < epoch_micros(cell.end),
    )
    async with transaction(writes=False) as connection:
        newest = await connection.scalar(statement)
    return None if newest is None else int(newest)


async def _repair(
    transaction: Transaction,
    name: str,
    mirror: IMetering,
    capabilities: Capabilities,
    meters: Sequence[Meter],
    cells: list[ReconcileCell],
    counted: Mapping[str, _Counted],
    clock: StoreClock,
) -> list[ReconcileCell]:
    """Send each short sum or count cell of `meters` (those the mirror has a meter of)
    its corrections, each recorded first (see `_record`); the cells, those whose
    corrections the mirror took marked `repaired`. A cell whose window is older than the
    mirror accepts is left short. A record stays unless the mirror refused every
    correction of it: one it did not answer it may have taken all the same (an answer
    lost), and the cell is repaired again, if still short, after `REPAIR_SETTLE`
    (review)."""
    by_id = {meter.id: meter for meter in meters}
    now = await clock.now()
    oldest = None if capabilities.max_event_age is None else now - capabilities.max_event_age
    chosen: dict[int, list[UsageEvent]] = {}
    meterless = collections.Counter[str]()  # short cells by event name, of no meter there
    for index, cell in enumerate(cells):
        if cell.status is not CellStatus.short:
            continue
        meter = by_id.get(cell.meter_id)
        if meter is None:
            meterless[cell.event_name] += 1
            continue
        if meter.aggregation not in _ZERO_WHEN_ABSENT:
            continue
        at = cell.start if oldest is None else max(cell.start, oldest + timedelta(minutes=5))
        if at < cell.end:  # else the mirror no longer takes events of that window
            newest = await _newest_event(transaction, cell)
            try:
                chosen[index] = _corrections(meter, cell, at, newest)
            except ValidationError as exc:  # no event can carry it: this cell stays short
                logger.warning(
                    "mirror %r: cell %s / %s from %s left short, not repaired: %s",
                    name,
                    cell.event_name,
                    cell.customer_id,
                    cell.start.isoformat(),
                    exc,
                )
    for event_name, count in meterless.items():  # a line a meter, not a line a cell
        logger.warning(
            "mirror %r: %d short cell(s) of %r left unrepaired: the mirror has no meter of "
            "that event name to take a correction (`metering mirror link` makes it)",
            name,
            count,
            event_name,
        )
    recorded = await _record(
        transaction, name, cells, chosen, counted, now, _settling(capabilities)
    )
    owed = [event for index in recorded for event in chosen[index]]
    policy = DeliveryPolicy(mirror, MeteringSettings(), durable=False)
    taken: set[str] = set()
    refused: set[str] = set()
    size = capabilities.max_batch_size
    for first in range(0, len(owed), size):
        result = await policy.settle(owed[first : first + size])
        taken.update(result.accepted, result.duplicates)
        refused.update(i for i, why in result.rejected.items() if not why.startswith(GAVE_UP))
    done = {index for index in recorded if all(e.id in taken for e in chosen[index])}
    undone = [index for index in recorded if all(e.id in refused for e in chosen[index])]
    if undone:  # refused, so never taken: the record would hold the cell's events back
        await _unrecord(transaction, name, [cells[index] for index in undone], now)
    return [
        cell.model_copy(update={"repaired": True}) if index in done else cell
        for index, cell in enumerate(cells)
    ]


_ONE_REPAIR = sa.text("SELECT pg_advisory_xact_lock(hashtext('metering repair ' || :mirror))")


async def one_repair_at_a_time(connection: AsyncConnection, mirror: str) -> None:
    """Take, for the rest of the transaction, `mirror`'s turn among the transactions that
    decide what it is sent of the ledger's past: repairs, backfills, retried dead letters.
    Each checks what the others committed (`held_by_repair`, owed rows), and two checking
    at once would each see none of the other's (PostgreSQL's read committed); SQLite's one
    writer takes them in turn already."""
    if connection.dialect.name == "postgresql":
        await connection.execute(_ONE_REPAIR, {"mirror": mirror})


_OWED_WITHOUT_SEQ = (
    sa.select(1)
    .where(
        outbox.c.mirror == sa.bindparam("mirror"),
        outbox.c.kind == "usage",
        outbox.c.refused.is_(None),
        outbox.c.event_seq.is_(None),
    )
    .limit(1)
)


async def _record(
    transaction: Transaction,
    name: str,
    cells: Sequence[ReconcileCell],
    chosen: Mapping[int, Sequence[UsageEvent]],
    counted: Mapping[str, _Counted],
    now: datetime,
    settle: timedelta,
) -> set[int]:
    """Record the repair of each chosen cell that no repair overlapping it was sent to
    lately, or in another window (`_Repairs`), checked again as it is recorded, before
    anything is sent: two reconciles at once (a daily and an hourly cron) each read the
    repairs first, found none and sent the shortfall twice (probe). Each record is one
    statement that checks and inserts (on SQLite it holds the write lock as it reads);
    on PostgreSQL the repairs of a mirror are recorded one transaction at a time. The
    cells recorded."""
    recorded: set[int] = set()
    if not chosen:
        return recorded
    async with transaction() as connection:
        sqlite = connection.dialect.name == "sqlite"
        await one_repair_at_a_time(connection, name)
        # a usage row owed names its event by seq, or, written by a process still on
        # 0008, by id alone: such rows are looked for by id too, and only while some are
        # owed (no index finds them by id; a store mid-upgrade owes a few, then none)
        owed_event: sa.ColumnElement[bool] = events.c.seq == outbox.c.event_seq
        if await connection.scalar(_OWED_WITHOUT_SEQ, {"mirror": name}):
            by_id = outbox.c.event_seq.is_(None) & (events.c.id == outbox.c.event_id)
            owed_event = owed_event | by_id
        for index in chosen:
            cell = cells[index]
            since, until = epoch_micros(cell.start), epoch_micros(cell.end)
            amount = _difference(cell)
            # "lately" from when this reconcile read the cell, not from now: one that read
            # the mirror over an hour ago would take a repair sent since as old (review)
            lately = epoch_micros(counted[cell.meter_id].at - settle)
            blocking = sa.select(1).where(
                mirror_repairs.c.mirror == name,
                mirror_repairs.c.meter_id == cell.meter_id,
                mirror_repairs.c.customer_id == cell.customer_id,
                mirror_repairs.c.window_start < until,
                mirror_repairs.c.window_end > since,
                (mirror_repairs.c.sent_at >= lately)
                | (mirror_repairs.c.window_start != since)
                | (mirror_repairs.c.window_end != until),
            )
            # owed meanwhile (a backfill, a dead letter retried, since this reconcile read
            # what was owed): the mirror is to get those events, and the correction too
            # would count them twice (probe); the cell is left short, not repaired, and
            # the rows owed bring it level
            in_cell = (
                events.c.meter_seq == _meter_seq(cell.meter_id),
                events.c.customer_id == cell.customer_id,
                events.c.ts >= since,
                events.c.ts < until,
                events.c.seq <= counted[cell.meter_id].through,
            )
            owed = sa.select(1).where(
                outbox.c.mirror == name,
                outbox.c.kind == "usage",
                outbox.c.refused.is_(None),
                owed_event,
                *in_cell,
            )
            # and a cancellation owed, of an event the total counted: made after the
            # totals were read again, the correction would hold the event, and the
            # cancellation then find nothing to cancel there (probe: the mirror over)
            cancel_owed = sa.select(1).where(
                outbox.c.mirror == name,
                outbox.c.kind == "cancel",
                outbox.c.refused.is_(None),
                events.c.id == outbox.c.event_id,
                *in_cell,
            )
            row = sa.select(
                sa.literal(name),
                sa.literal(cell.meter_id),
                sa.literal(cell.customer_id),
                sa.literal(since),
                sa.literal(until),
                sa.literal(str(amount) if sqlite else amount, mirror_repairs.c.amount.type),
                sa.literal(epoch_micros(now)),
                sa.literal(counted[cell.meter_id].through),
            ).where(~sa.exists(blocking), ~sa.exists(owed), ~sa.exists(cancel_owed))
            inserted = await connection.execute(
                sa.insert(mirror_repairs).from_select(
                    [
                        "mirror",
                        "meter_id",
                        "customer_id",
                        "window_start",
                        "window_end",
                        "amount",
                        "sent_at",
                        "counted_through",
                    ],
                    row,
                )
            )
            if inserted.rowcount:
                recorded.add(index)
    return recorded


async def _unrecord(
    transaction: Transaction,
    name: str,
    cells: Sequence[ReconcileCell],
    sent_at: datetime,
) -> None:
    """Take back the records `_record` made of `cells` (this repair's: their
    `sent_at`)."""
    async with transaction() as connection:
        for cell in cells:
            await connection.execute(
                sa.delete(mirror_repairs).where(
                    mirror_repairs.c.mirror == name,
                    mirror_repairs.c.meter_id == cell.meter_id,
                    mirror_repairs.c.customer_id == cell.customer_id,
                    mirror_repairs.c.window_start == epoch_micros(cell.start),
                    mirror_repairs.c.window_end == epoch_micros(cell.end),
                    mirror_repairs.c.sent_at == epoch_micros(sent_at),
                )
            )


def _billed_nowhere(
    meter: Meter,
    ours: dict[Key, tuple[datetime, Decimal]],
    waiting: Mapping[tuple[str, bool], _Times],
) -> list[ReconcileCell]:
    """The ledger's cells of a meter the mirror has none of (none linked, none of its
    event name), is not owed, and could hold: the mirror bills nothing of them, so each
    cell with usage is short (refused where the mirror refused its events, pending where
    some are still owed), never "not comparable" in a report that is ok (probe: the
    mirror's meter deleted there, and reconcile exited 0 while it billed nothing)."""
    none = _Times()

    def status(customer: str, start: datetime, end: datetime, value: Decimal) -> CellStatus:
        return _status(
            meter.aggregation,
            value,
            None,
            refused=waiting.get((customer, True), none).within(start, end),
            pending=waiting.get((customer, False), none).within(start, end),
            exact=True,
        )

    return _ledger_only(meter, ours, status)


def _not_comparable(
    meter: Meter,
    ours: dict[Key, tuple[datetime, Decimal]],
    waiting: Mapping[tuple[str, bool], _Times],
    *,
    arriving: bool,
) -> list[ReconcileCell]:
    """The ledger's cells of a meter the mirror cannot be asked about: not comparable;
    but refused where the mirror refused events of it (its meter, when the mirror's of
    that name aggregates otherwise): those are not billed there, whatever it holds; and
    pending where the meter is `arriving`: never linked to one of the mirror's, its
    making still owed, and of a window and aggregation the mirror has (probe: a meter
    the mirror's key could not make read not comparable, while the mirror would bill
    0)."""
    none = _Times()

    def status(customer: str, start: datetime, end: datetime, value: Decimal) -> CellStatus:
        if waiting.get((customer, True), none).within(start, end):
            return CellStatus.refused
        if arriving:
            return CellStatus.pending
        return CellStatus.not_comparable

    return _ledger_only(meter, ours, status)


def _ledger_only(
    meter: Meter,
    ours: dict[Key, tuple[datetime, Decimal]],
    status: Callable[[str, datetime, datetime, Decimal], CellStatus],
) -> list[ReconcileCell]:
    """The ledger's cells of a meter with no answer from the mirror, each of `status`."""
    return [
        ReconcileCell(
            meter_id=meter.id,
            event_name=meter.event_name,
            customer_id=customer,
            start=start,
            end=end,
            ledger=value,
            mirror=None,
            status=status(customer, start, end, value),
        )
        for (customer, start), (end, value) in sorted(ours.items())
    ]
