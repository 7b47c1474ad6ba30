"""The tables of the durable store (SQLAlchemy Core), as the migrations create them.

Times are integer microseconds since the epoch (exact, and the same on every database).
Values are exact decimals: `numeric` on PostgreSQL, text on SQLite (summed by the store's
own decimal aggregates there). Events keep their row after their meter is deleted or they
are cancelled, so an id once seen stays a duplicate, as on every provider.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "BUCKET",
    "CHANGES",
    "ROLLED_UP",
    "customers",
    "events",
    "metadata",
    "meters",
    "mirror_backfills",
    "mirror_deliveries",
    "mirror_meters",
    "mirror_notices",
    "mirror_repairs",
    "mirrors",
    "outbox",
    "rollups",
]

metadata = sa.MetaData()

Sequence = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
"""An auto-incrementing key: BIGINT identity on PostgreSQL, the rowid on SQLite."""

Value = sa.Numeric().with_variant(sa.Text(), "sqlite")
"""An exact decimal; SQLite has no such type, so the text of the Decimal is kept."""

meters = sa.Table(
    "meters",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(100), nullable=False, unique=True),
    sa.Column("event_name", sa.String(100), nullable=False, unique=True),
    sa.Column("display_name", sa.String(250), nullable=False),
    sa.Column("aggregation", sa.String(20), nullable=False),
    sa.Column("dimensions", sa.JSON, nullable=False),
    sa.Column("description", sa.String(1000)),
    sa.Column("unique_dimension", sa.String(100)),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sqlite_autoincrement=True,  # a deleted meter's number is never given to another
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(100), nullable=False, unique=True),
    sa.Column("meter_seq", sa.BigInteger, nullable=False),
    sa.Column("event_name", sa.String(100), nullable=False),
    sa.Column("customer_id", sa.String(100), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("value", Value, nullable=False),
    sa.Column("dimensions", sa.JSON, nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("ingested_at", sa.BigInteger),  # NULL for events stored before 0003
    # PostgreSQL: one customer's range by index, and time ranges across customers
    sa.Index("events_meter_customer_ts", "meter_seq", "customer_id", "ts").ddl_if(
        dialect="postgresql"
    ),
    sa.Index("events_meter_ts", "meter_seq", "ts").ddl_if(dialect="postgresql"),
    # SQLite: time first, so live ingest appends (see migration 0002)
    sa.Index("events_meter_ts_customer", "meter_seq", "ts", "customer_id").ddl_if(dialect="sqlite"),
    sqlite_autoincrement=True,
)

BUCKET = 900_000_000
"""A rollup's width, 15 minutes in microseconds: every time zone's offset from UTC is a
whole number of quarter hours (Asia/Kolkata +5:30, Asia/Kathmandu +5:45), so the windows
of any zone are runs of whole buckets."""

ROLLED_UP = ("sum", "count", "avg")
"""The aggregations a rollup's count and total answer; the others read their events."""

rollups = sa.Table(
    "rollups",
    metadata,
    sa.Column("meter_seq", sa.BigInteger, primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),
    sa.Column("digest", sa.String(32), primary_key=True),
    sa.Column("dimensions", sa.Text, nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("total", Value, nullable=False),
)
"""Count and total of a meter's events per 15 minutes (UTC) and dimensions (canonical
JSON text, keyed by its MD5: dimensions of any size fit an index), for meters whose
aggregation they answer. Each ingested batch adds to its
rows, in key order (two writers then never wait on each other in a cycle), and a
cancellation takes away, in the same transaction: a rollup never disagrees with the
events, and it holds at most one row per meter, quarter hour and dimensions however the
events arrive."""

customers = sa.Table(
    "customers",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(256)),
    sa.Column("email", sa.String(512)),
    sa.Column("metadata", sa.JSON, nullable=False),
)

_OWED = sa.text("refused IS NULL")

CHANGES = ("meter", "customer")
"""Outbox kinds that carry a change of a meter or a customer (the row's `event_id` holds
its id); "usage" and "cancel" rows carry an event's."""

_CHANGE_OWED = sa.text("refused IS NULL AND kind IN ('meter', 'customer')")

_DEAD = sa.text("refused IS NOT NULL")

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("mirror", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(10), nullable=False),  # usage, cancel, meter, customer
    sa.Column("event_id", sa.String(100), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("claimed_until", sa.BigInteger),  # a forwarder's lease on the row
    sa.Column("refused", sa.Text),  # the mirror's reason: a mirror dead letter
    sa.Column("event_seq", sa.BigInteger),  # usage: where the event lies in `events` (0009)
    sa.Index("outbox_owed", "mirror", "seq", postgresql_where=_OWED, sqlite_where=_OWED),
    sa.Index(
        "outbox_changes",
        "mirror",
        "seq",
        postgresql_where=_CHANGE_OWED,
        sqlite_where=_CHANGE_OWED,
    ),
    sa.Index("outbox_dead", "mirror", "kind", postgresql_where=_DEAD, sqlite_where=_DEAD),
    sqlite_autoincrement=True,
    postgresql_with={"fillfactor": 50},  # a claim's update stays on its page (0006)
)
"""What each mirror is still owed: a row per stored event (and per cancellation) per
mirror, written in the transaction that stored it, so the ledger and its outbox never
disagree; a forwarder leases rows, delivers them and deletes them, or marks them refused
with the mirror's reason (a dead letter, kept). So the table holds what is owed and the
dead letters, never the history: it stays as small as the longest outage. A meter's or a
customer's change is owed the same way, and is delivered before any later row."""

mirror_meters = sa.Table(
    "mirror_meters",
    metadata,
    sa.Column("mirror", sa.String(100), primary_key=True),
    sa.Column("meter_id", sa.String(100), primary_key=True),
    sa.Column("mirror_meter_id", sa.String(100), nullable=False),
    sa.Column("created", sa.Boolean, nullable=False),
    sa.Column("linked_at", sa.BigInteger, nullable=False),
)
"""Which meter of each mirror is the ledger's meter there (found by event name, or
created), so updates reach that meter and reconcile compares the two; a meter the ledger
created there is deleted there with the ledger's (one it found is left to its owners)."""

mirror_repairs = sa.Table(
    "mirror_repairs",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("mirror", sa.String(100), nullable=False),
    sa.Column("meter_id", sa.String(100), nullable=False),
    sa.Column("customer_id", sa.String(100), nullable=False),
    sa.Column("window_start", sa.BigInteger, nullable=False),
    sa.Column("window_end", sa.BigInteger, nullable=False),
    sa.Column("amount", Value, nullable=False),
    sa.Column("sent_at", sa.BigInteger, nullable=False),
    sa.Column("counted_through", sa.BigInteger),  # the highest event seq counted (0008)
    sa.Index("mirror_repairs_cell", "mirror", "window_start"),
    sqlite_autoincrement=True,
)
"""Each correction reconcile's repair sent a mirror, recorded before it is sent: a cell
repaired lately is not repaired again until the mirror has had time to show it, and the
events of the cell up to `counted_through` are not sent again (the correction holds
them)."""

mirror_deliveries = sa.Table(
    "mirror_deliveries",
    metadata,
    sa.Column("mirror", sa.String(100), primary_key=True),
    sa.Column("event_name", sa.String(100), primary_key=True),
    sa.Column("customer_id", sa.String(100), primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),  # the events' UTC hour, its start
    sa.Column("delivered_at", sa.BigInteger, nullable=False),
    sa.Index("mirror_deliveries_at", "mirror", "delivered_at"),
)
"""When a forwarder last delivered events of an (event name, customer, hour of event
time) to a mirror that shows them only after a processing delay
(`Capabilities.processing_delay`: Stripe): reconcile holds the cells they fall in
`pending` until the delay has passed. Written as a pass's rows are settled; kept for
three times the delay (0010). Per customer and hour, so one late event holds back its own
cell, not every cell of every customer between it and now (review)."""

mirrors = sa.Table(
    "mirrors",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("added_at", sa.BigInteger),  # NULL: unknown (0011)
)
"""When each mirror was first configured on this store: events stored since are owed to
it through the outbox, and a backfill sends it only those stored before. Unknown for a
mirror of a store that forwarded before 0005 recorded this: a backfill of a mirror that
forgets ids is then told when (`backfill_mirror(mirror_added=)`)."""

mirror_backfills = sa.Table(
    "mirror_backfills",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("mirror", sa.String(100), nullable=False),
    sa.Column("start", sa.BigInteger, nullable=False),
    sa.Column("end", sa.BigInteger, nullable=False),
    sa.Column("at", sa.BigInteger, nullable=False),
    sqlite_autoincrement=True,
)
"""Each backfill of a mirror, so one that would send the same events again to a mirror
that forgets ids (Stripe, after 24 hours) is refused."""

mirror_notices = sa.Table(
    "mirror_notices",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("mirror", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(100), nullable=False),
    sa.Column("error_count", sa.Integer, nullable=False),
    sa.Column("received_at", sa.BigInteger, nullable=False),
)
"""Each refusal notice a mirror sent (a webhook), by its id: one delivered again (Stripe
retries, or a replay) is recorded once."""
