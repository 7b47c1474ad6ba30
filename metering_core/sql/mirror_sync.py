"""Meters and customers follow the ledger to each mirror.

A change of a meter or a customer is owed to every mirror as an outbox row (kind "meter"
or "customer", holding its id), and the forwarder makes the mirror match what the ledger
holds *now*: the meter created there (or found by its event name, and linked), updated,
or deleted; the customer created (one deleted here stays there: see `sync_customer`).
Bringing a mirror to the ledger's state, rather than replaying each change, makes a row
safe to deliver twice and lets a mirror that was down catch up in one step. `metering
mirror link` does the same for every meter and customer at once, for what the ledger held
before the mirror was added.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

import sqlalchemy as sa

from metering_core.errors import ConflictError, NotFoundError, UnsupportedOperationError
from metering_core.interface import Capabilities, IMetering, Operation
from metering_core.models import (
    Aggregation,
    Customer,
    CustomerCreate,
    LinkOutcome,
    Meter,
    MeterCreate,
    MeterUpdate,
    MirrorLink,
)
from metering_core.sql.rows import Transaction, customer_from_row, meter_from_row
from metering_core.sql.schema import customers, meters, mirror_meters

__all__ = [
    "Refused",
    "ledger_customer",
    "ledger_meter",
    "mismatch",
    "named",
    "refusal",
    "sync_customer",
    "sync_meter",
]

_MIRRORED_FIELDS = ("display_name", "description", "dimensions")
"""A meter's fields that may change, and that a mirror keeps in step."""


class Refused(Exception):
    """The mirror cannot hold a meter as the ledger has it: a dead letter, not a retry."""


def refusal(mirror: str, aggregation: Aggregation, capabilities: Capabilities) -> str | None:
    """Why `mirror` cannot bill a meter of `aggregation`, or None. A meter's dimensions are
    no obstacle: a mirror without them bills the meter's totals, and grouping and filtering
    stay the ledger's."""
    if aggregation in capabilities.aggregations:
        return None
    has = ", ".join(sorted(a.value for a in capabilities.aggregations))
    return (
        f"mirror {mirror!r} has no {aggregation.value!r} aggregation (it has {has}); "
        "a meter of it could not be billed there"
    )


async def _their_meters(mirror: IMetering) -> AsyncIterator[Meter]:
    cursor = None
    while True:
        page = await mirror.fetch_all_meters(limit=100, cursor=cursor)
        for meter in page.items:
            yield meter
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


async def named(mirror: IMetering, event_name: str) -> Meter | None:
    """The mirror's meter of this event name, active or not."""
    async for meter in _their_meters(mirror):
        if meter.event_name == event_name:
            return meter
    return None


def _created(meter: Meter, capabilities: Capabilities) -> MeterCreate:
    """The meter as the mirror can keep it: its dimensions and description only where
    the mirror keeps them (Stripe keeps neither; it bills the meter's totals)."""
    keeps = capabilities.updatable_meter_fields
    return MeterCreate(
        event_name=meter.event_name,
        display_name=meter.display_name,
        aggregation=meter.aggregation,
        dimensions=list(meter.dimensions) if capabilities.dimensions else [],
        description=meter.description if "description" in keeps else None,
        unique_dimension=meter.unique_dimension,
    )


class _Link(NamedTuple):
    theirs: str
    created: bool
    """The ledger created the mirror's meter (else it found it there, and leaves it be
    when its own goes: other writers may still use it)."""


async def _linked(transaction: Transaction, name: str, meter_id: str) -> _Link | None:
    async with transaction(writes=False) as connection:
        row = (
            await connection.execute(
                sa.select(mirror_meters.c.mirror_meter_id, mirror_meters.c.created).where(
                    mirror_meters.c.mirror == name, mirror_meters.c.meter_id == meter_id
                )
            )
        ).first()
    return None if row is None else _Link(row[0], bool(row[1]))


async def _link(transaction: Transaction, name: str, meter_id: str, link: _Link | None) -> None:
    async with transaction() as connection:
        mine = (mirror_meters.c.mirror == name) & (mirror_meters.c.meter_id == meter_id)
        await connection.execute(sa.delete(mirror_meters).where(mine))
        if link is not None:
            await connection.execute(
                sa.insert(mirror_meters).values(
                    mirror=name,
                    meter_id=meter_id,
                    mirror_meter_id=link.theirs,
                    created=link.created,
                    linked_at=int(time.time() * 1e6),
                )
            )


async def sync_meter(
    transaction: Transaction, name: str, mirror: IMetering, meter_id: str, ledger: Meter | None
) -> MirrorLink:
    """Make `mirror`'s counterpart of the ledger meter `meter_id` match `ledger` (None: the
    meter is gone from the ledger; the mirror's goes too if the ledger created it).
    `Refused` when the mirror cannot hold it; any other failure is the mirror failing,
    to try again."""
    linked = await _linked(transaction, name, meter_id)

    def done(outcome: LinkOutcome, theirs: str | None) -> MirrorLink:
        return MirrorLink(mirror=name, kind="meter", id=meter_id, mirror_id=theirs, outcome=outcome)

    if ledger is None:
        if linked is None:
            return done(LinkOutcome.unchanged, None)
        if linked.created:
            with contextlib.suppress(NotFoundError):  # deleted there already
                await mirror.delete_meter(linked.theirs)
        await _link(transaction, name, meter_id, None)
        return done(LinkOutcome.deleted if linked.created else LinkOutcome.unchanged, None)

    capabilities = await mirror.load_capabilities()
    reason = refusal(name, ledger.aggregation, capabilities)
    if reason is not None:
        raise Refused(reason)
    theirs: Meter | None = None
    if linked is not None:
        try:
            theirs = await mirror.fetch_meter(linked.theirs)
        except NotFoundError:
            theirs = None  # deleted on the mirror: found or created again below
    if theirs is None:
        created = False
        theirs = await named(mirror, ledger.event_name)
        if theirs is None:
            try:
                theirs = await mirror.create_meter(_created(ledger, capabilities))
                created = True
            except ConflictError:  # another forwarder created it meanwhile
                theirs = await named(mirror, ledger.event_name)
                if theirs is None:
                    raise
        _check_counterpart(name, ledger, theirs)
        await _link(transaction, name, meter_id, _Link(theirs.id, created))
        if created:
            return done(LinkOutcome.created, theirs.id)
        outcome = LinkOutcome.linked
    else:
        _check_counterpart(name, ledger, theirs)
        outcome = LinkOutcome.unchanged
    changes = {
        field: getattr(ledger, field)
        for field in _MIRRORED_FIELDS
        if field in capabilities.updatable_meter_fields
        and (field != "dimensions" or capabilities.dimensions)
        and getattr(ledger, field) != getattr(theirs, field)
    }
    if changes:
        await mirror.update_meter(theirs.id, MeterUpdate(**changes))
        outcome = LinkOutcome.updated if outcome is LinkOutcome.unchanged else outcome
    return done(outcome, theirs.id)


def mismatch(name: str, event_name: str, theirs: Meter, ledger: Meter | MeterCreate) -> str | None:
    """Why the mirror's meter of `event_name` cannot be the ledger's, or None."""
    if (theirs.aggregation, theirs.unique_dimension) == (
        ledger.aggregation,
        ledger.unique_dimension,
    ):
        return None
    return (
        f"mirror {name!r} has a meter for event_name={event_name!r} "
        f"({theirs.id}) aggregating {theirs.aggregation.value!r} "
        f"(unique_dimension={theirs.unique_dimension!r}), not "
        f"{ledger.aggregation.value!r} (unique_dimension={ledger.unique_dimension!r})"
    )


def _check_counterpart(name: str, ledger: Meter, theirs: Meter) -> None:
    """`Refused` unless the mirror's meter bills as the ledger's does, and takes events."""
    reason = mismatch(name, ledger.event_name, theirs, ledger)
    if reason is not None:
        raise Refused(reason)
    if theirs.status != "active":
        raise Refused(
            f"mirror {name!r} has the meter for event_name={ledger.event_name!r} "
            f"({theirs.id}) inactive: it takes no events; reactivate it there "
            "(Stripe: POST /v1/billing/meters/{id}/reactivate), then `metering mirror retry`"
        )


async def ledger_meter(transaction: Transaction, meter_id: str) -> Meter | None:
    """The ledger's meter `meter_id`, or None when it is gone."""
    async with transaction(writes=False) as connection:
        row = (await connection.execute(sa.select(meters).where(meters.c.id == meter_id))).first()
    return None if row is None else meter_from_row(row)


async def ledger_customer(transaction: Transaction, customer_id: str) -> Customer | None:
    """The ledger's customer `customer_id`, or None when it is gone."""
    async with transaction(writes=False) as connection:
        row = (
            await connection.execute(sa.select(customers).where(customers.c.id == customer_id))
        ).first()
    if row is None:
        return None
    return customer_from_row(row)


async def sync_customer(
    name: str, mirror: IMetering, customer_id: str, ledger: Customer | None
) -> MirrorLink:
    """Create the ledger's customer on `mirror` (one that is there already, even with
    other fields, stays as it is: the mirror bills it by its id). A customer gone from the
    ledger stays on the mirror: deleting a billing customer (Stripe) cancels its
    subscriptions and drops what is not yet invoiced, so that is the billing team's call.
    A mirror without customers has nothing to follow."""
    capabilities = await mirror.load_capabilities()

    def done(outcome: LinkOutcome, theirs: str | None) -> MirrorLink:
        return MirrorLink(
            mirror=name, kind="customer", id=customer_id, mirror_id=theirs, outcome=outcome
        )

    if ledger is None or not capabilities.supports(Operation.CREATE_CUSTOMER):
        return done(LinkOutcome.unchanged, None)
    wanted = CustomerCreate(**ledger.model_dump(exclude={"provider_ref"}))
    try:
        created = await mirror.create_customer(wanted)
    except ConflictError:
        return done(LinkOutcome.linked, customer_id)
    except UnsupportedOperationError:
        return done(LinkOutcome.unchanged, None)
    return done(LinkOutcome.created, created.provider_ref or created.id)
