"""Reconcile: prove a mirror holds what the ledger holds, meter by customer by window.

Both sides are asked the same question (the meter's aggregation over the same windows,
per customer), and each cell is compared exactly: equal, short (the mirror would
invoice less), over (more), pending (different, while the ledger still owes the mirror
events of that cell), or not comparable (the mirror cannot answer: a window, an
aggregation or a meter it does not have, or a meter of another aggregation). A mirror
that answers one customer at a time is asked for each customer the ledger has events of,
so usage of a customer the ledger never saw is visible only on mirrors that group by
customer. Nothing is guessed: a cell either side does
not answer is 0 for sum and count, and absent for the others.

Repair sends, for each short cell of a sum or count meter, the difference to the mirror as
correction events whose ids derive from the cell and both totals (a repair interrupted
and run again sends the same ids, which the mirror answers duplicate), and records it: a
cell overlapping a recent repair is pending, not repaired again (see `_Repairs`). An
over-count, or a cell of another aggregation, is reported and left alone: taking usage
away, or guessing what a max was, is not a correction a store can prove right.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

import sqlalchemy as sa

from metering_core.config import MeteringSettings
from metering_core.delivery import DeliveryPolicy
from metering_core.epoch import epoch_micros
from metering_core.errors import UnsupportedOperationError, ValidationError
from metering_core.interface import Capabilities, IMetering
from metering_core.models import (
    Aggregation,
    CellStatus,
    Meter,
    ReconcileCell,
    ReconcileReport,
    UsageEvent,
    UsageQuery,
    Window,
)
from metering_core.sql.rows import Transaction
from metering_core.sql.schema import events, mirror_meters, mirror_repairs, outbox

__all__ = ["DRIFT", "REPAIR_SETTLE", "reconcile"]

Key = tuple[str, datetime]  # customer, window start
_ZERO_WHEN_ABSENT = (Aggregation.SUM, Aggregation.COUNT)

DRIFT = frozenset({CellStatus.short, CellStatus.over, CellStatus.refused})
"""Cell statuses that make a report not ok."""

REPAIR_SETTLE = timedelta(hours=1)
"""How long a repaired cell is `pending` and not repaired again: the mirror may not show
the correction yet (Stripe takes minutes), and a second one would count it twice."""

_LONGEST_WINDOW = timedelta(days=31)

ASKED_AT_ONCE = 8
"""Customers a mirror that answers one at a time (Stripe) is asked about at once: its
round trips overlap, within what its rate limits allow."""


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
            usage = await provider.fetch_usage(query.model_copy(update={"customer_id": customer}))
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
    event_names: Collection[str],
    start: datetime,
    end: datetime,
) -> list[tuple[str, str, int, bool]]:
    """(event name, customer, time, refused) of the events in range the ledger has not
    delivered to `mirror`: still owed, or refused by it (its dead letters)."""
    statement = (
        sa.select(
            events.c.event_name, events.c.customer_id, events.c.ts, outbox.c.refused.is_not(None)
        )
        .join(outbox, outbox.c.event_id == events.c.id)
        .where(
            outbox.c.mirror == mirror,
            outbox.c.kind == "usage",
            events.c.event_name.in_(list(event_names)),
            events.c.ts >= epoch_micros(start),
            events.c.ts < epoch_micros(end),
        )
    )
    async with transaction(writes=False) as connection:
        return [
            (row[0], row[1], row[2], bool(row[3])) for row in await connection.execute(statement)
        ]


class _Repair(NamedTuple):
    start: int
    end: int
    sent_at: int


class _Repairs:
    """The repairs sent to a mirror's cells, by meter and customer: a cell overlapping
    one sent lately is pending (the mirror may not show it yet: Stripe takes minutes),
    and a cell is repaired again only where every earlier repair is old and was of that
    same window (a correction sits at its window's start, so a finer or coarser window
    would see the same shortfall and send it twice)."""

    def __init__(self, found: dict[tuple[str, str], list[_Repair]], now: datetime) -> None:
        self._found = found
        self._lately = epoch_micros(now - REPAIR_SETTLE)

    def _overlapping(
        self, meter: str, customer: str, start: datetime, end: datetime
    ) -> list[_Repair]:
        since, until = epoch_micros(start), epoch_micros(end)
        found = self._found.get((meter, customer), [])
        return [r for r in found if r.start < until and r.end > since]

    def lately(self, meter: str, customer: str, start: datetime, end: datetime) -> bool:
        overlapping = self._overlapping(meter, customer, start, end)
        return any(r.sent_at >= self._lately for r in overlapping)

    def repairable(self, cell: ReconcileCell) -> bool:
        window = (epoch_micros(cell.start), epoch_micros(cell.end))
        overlapping = self._overlapping(cell.meter_id, cell.customer_id, cell.start, cell.end)
        return all(r.sent_at < self._lately and (r.start, r.end) == window for r in overlapping)


async def _repairs(
    transaction: Transaction, mirror: str, start: datetime, end: datetime
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
    return _Repairs(found, datetime.now(UTC))


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


def _status(
    aggregation: Aggregation,
    ledger: Decimal | None,
    mirror: Decimal | None,
    *,
    refused: bool,
    pending: bool,
) -> CellStatus:
    if aggregation in _ZERO_WHEN_ABSENT:
        ledger, mirror = ledger or Decimal(0), mirror or Decimal(0)
    if ledger == mirror:
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
    *,
    start: datetime,
    end: datetime,
    window: Window = Window.DAY,
    meter_ids: Sequence[str] | None = None,
    repair: bool = False,
) -> ReconcileReport:
    """Compare every (meter, customer, window) of the ledger with `mirror`'s; with
    `repair`, send each short sum or count cell its correction."""
    mine = [m for m in await _meters(ledger) if meter_ids is None or m.id in meter_ids]
    found = await _meters(mirror)
    by_id = {m.id: m for m in found}
    by_name = {m.event_name: m for m in found}
    async with transaction(writes=False) as connection:
        linked = sa.select(mirror_meters.c.meter_id, mirror_meters.c.mirror_meter_id).where(
            mirror_meters.c.mirror == mirror_name
        )
        links = {mine: theirs for mine, theirs in await connection.execute(linked)}
    capabilities = await mirror.load_capabilities()
    unsent = await _unsent(transaction, mirror_name, {m.event_name for m in mine}, start, end)
    repaired = await _repairs(transaction, mirror_name, start, end)
    cells: list[ReconcileCell] = []
    for meter in mine:
        query = UsageQuery(meter_id=meter.id, start=start, end=end, window=window)
        ours = await _usage(ledger, query, (), grouped=True)
        # A mirror asked one customer at a time is asked for every customer the ledger
        # has events of in range, cancelled ones too: all cancelled here may be billed there.
        customers = await _customers(transaction, meter.event_name, start, end)
        link = links.get(meter.id)
        counterpart = by_id.get(link) if link else by_name.get(meter.event_name)
        comparable = (
            counterpart is not None
            and counterpart.aggregation == meter.aggregation  # else equal is a coincidence
            and counterpart.unique_dimension == meter.unique_dimension
            and window in capabilities.windows
            and meter.aggregation in capabilities.aggregations
        )
        if not comparable or counterpart is None:
            cells.extend(_not_comparable(meter, ours))
            continue
        asked = query.model_copy(update={"meter_id": counterpart.id})
        grouped = capabilities.group_by and not capabilities.requires_customer
        try:
            answered = await _usage(mirror, asked, customers, grouped)
        except (UnsupportedOperationError, ValidationError):  # a query it cannot answer
            cells.extend(_not_comparable(meter, ours))
            continue
        waiting: dict[tuple[str, bool], _Times] = {}
        for name, customer, ts, refused in unsent:
            if name == meter.event_name:
                waiting.setdefault((customer, refused), _Times()).times.append(ts)
        for times in waiting.values():
            times.times.sort()
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
                refused=waiting.get((key[0], True), none).within(key[1], closes),
                pending=waiting.get((key[0], False), none).within(key[1], closes)
                or repaired.lately(meter.id, key[0], key[1], closes),
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
        cells = await _repair(transaction, mirror_name, mirror, capabilities, mine, cells, repaired)
    return ReconcileReport(mirror=mirror_name, ok=ok, cells=cells)


def _corrections(meter: Meter, cell: ReconcileCell, at: datetime) -> list[UsageEvent]:
    """The events that bring a short cell up to the ledger's total, with ids derived from
    the cell and both totals (the same drift gives the same ids)."""
    assert cell.ledger is not None
    missing = cell.ledger - (cell.mirror or Decimal(0))
    key = f"{meter.id}|{cell.customer_id}|{cell.start.isoformat()}|{cell.end.isoformat()}"
    digest = hashlib.sha256(f"{key}|{cell.ledger}|{cell.mirror}".encode()).hexdigest()[:40]

    def correction(suffix: str, value: Decimal) -> UsageEvent:
        return UsageEvent(
            id=f"reconcile-{digest}{suffix}",
            event_name=meter.event_name,
            customer_id=cell.customer_id,
            value=value,
            timestamp=at,
        )

    if meter.aggregation is Aggregation.SUM:
        return [correction("", missing)]
    return [correction(f"-{n}", Decimal(1)) for n in range(int(missing))]


async def _repair(
    transaction: Transaction,
    name: str,
    mirror: IMetering,
    capabilities: Capabilities,
    meters: Sequence[Meter],
    cells: list[ReconcileCell],
    repaired: _Repairs,
) -> list[ReconcileCell]:
    """Send each short sum or count cell its corrections, and record each repair (see
    `_Repairs` for when a cell is repaired again); the cells, those whose corrections the
    mirror took marked `repaired`. A cell whose window is older than the mirror accepts is
    left short."""
    by_id = {meter.id: meter for meter in meters}
    now = datetime.now(UTC)
    oldest = None if capabilities.max_event_age is None else now - capabilities.max_event_age
    sent: dict[int, list[str]] = {}
    owed: list[UsageEvent] = []
    for index, cell in enumerate(cells):
        meter = by_id[cell.meter_id]
        if cell.status is not CellStatus.short or meter.aggregation not in _ZERO_WHEN_ABSENT:
            continue
        if not repaired.repairable(cell):
            continue
        at = cell.start if oldest is None else max(cell.start, oldest + timedelta(minutes=5))
        if at >= cell.end:
            continue  # the mirror no longer takes events of that window
        corrections = _corrections(meter, cell, at)
        sent[index] = [event.id for event in corrections]
        owed.extend(corrections)
    if not owed:
        return cells
    policy = DeliveryPolicy(mirror, MeteringSettings(), durable=False)
    taken: set[str] = set()
    size = capabilities.max_batch_size
    for first in range(0, len(owed), size):
        result = await policy.settle(owed[first : first + size])
        taken.update(result.accepted, result.duplicates)
    done = {index for index, ids in sent.items() if all(i in taken for i in ids)}
    if done:
        records = [
            {
                "mirror": name,
                "meter_id": cells[index].meter_id,
                "customer_id": cells[index].customer_id,
                "window_start": epoch_micros(cells[index].start),
                "window_end": epoch_micros(cells[index].end),
                "amount": (cells[index].ledger or Decimal(0)) - (cells[index].mirror or 0),
                "sent_at": epoch_micros(now),
            }
            for index in sorted(done)
        ]
        async with transaction() as connection:
            if connection.dialect.name == "sqlite":  # an exact decimal is text there
                records = [{**record, "amount": str(record["amount"])} for record in records]
            await connection.execute(sa.insert(mirror_repairs), records)
    return [
        cell.model_copy(update={"repaired": True}) if index in done else cell
        for index, cell in enumerate(cells)
    ]


def _not_comparable(meter: Meter, ours: dict[Key, tuple[datetime, Decimal]]) -> list[ReconcileCell]:
    return [
        ReconcileCell(
            meter_id=meter.id,
            event_name=meter.event_name,
            customer_id=customer,
            start=start,
            end=end,
            ledger=value,
            mirror=None,
            status=CellStatus.not_comparable,
        )
        for (customer, start), (end, value) in sorted(ours.items())
    ]
