"""A batch of events into the store, and its rollups, in one transaction.

The rows travel as one JSON array (SQLite, unpacked by `json_each`) or as one array per
column (PostgreSQL, unpacked by `unnest`), so the cost per event is the database's, not
the driver's parameter handling. `ON CONFLICT (id) DO NOTHING RETURNING` answers with
exactly the rows this statement inserted: a known id, from this batch or any process, is
left out, and so is a duplicate. The rollups of a batch are made from those rows alone.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from metering_core.memory.store import epoch_micros
from metering_core.models import UsageEvent
from metering_core.sql.schema import HOUR

__all__ = ["insert_events"]

_HOUR_OF = f"ts - ((ts % {HOUR}) + {HOUR}) % {HOUR}"
"""The UTC hour an event falls in (floored: times before 1970 are negative)."""

_SQLITE = sa.text(
    """
    INSERT INTO events (id, meter_seq, event_name, customer_id, ts, value, dimensions)
    SELECT json_extract(e.value, '$[0]'), json_extract(e.value, '$[1]'),
           json_extract(e.value, '$[2]'), json_extract(e.value, '$[3]'),
           json_extract(e.value, '$[4]'), json_extract(e.value, '$[5]'),
           json_extract(e.value, '$[6]')
    FROM json_each(:rows) AS e
    WHERE true
    ON CONFLICT (id) DO NOTHING
    RETURNING id, seq
    """
)

_SQLITE_ROLLUPS = sa.text(
    f"""
    INSERT INTO rollups (meter_seq, hour, dimensions, count, total)
    SELECT meter_seq, {_HOUR_OF}, dimensions, count(*), dec_sum(value)
    FROM events
    WHERE seq BETWEEN :first AND :last AND meter_seq IN (SELECT value FROM json_each(:meters))
    GROUP BY 1, 2, 3
    """
)
"""The batch's rows are the seqs it was given: the statement before holds the write lock
until commit, so no other writer's rows fall between them."""

_POSTGRES = sa.text(
    f"""
    WITH arrived AS MATERIALIZED (
        SELECT nextval(pg_get_serial_sequence('events', 'seq')) AS seq, u.*
        FROM unnest(:ids, :meters, :names, :customers, :times, :values, :dimensions)
            AS u (id, meter_seq, event_name, customer_id, ts, value, dimensions)
    ), inserted AS (
        INSERT INTO events (seq, id, meter_seq, event_name, customer_id, ts, value, dimensions)
        SELECT * FROM arrived ORDER BY id
        ON CONFLICT (id) DO NOTHING
        RETURNING id, meter_seq, ts, value, dimensions
    ), rolled AS (
        INSERT INTO rollups (meter_seq, hour, dimensions, count, total)
        SELECT meter_seq, {_HOUR_OF}, CAST(dimensions AS TEXT), count(*), sum(value)
        FROM inserted
        WHERE meter_seq = ANY(:rolled_up)
        GROUP BY 1, 2, 3
    )
    SELECT id FROM inserted
    """
).bindparams(
    sa.bindparam("ids", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("meters", type_=postgresql.ARRAY(sa.BigInteger)),
    sa.bindparam("names", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("customers", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("times", type_=postgresql.ARRAY(sa.BigInteger)),
    sa.bindparam("values", type_=postgresql.ARRAY(sa.Numeric)),
    sa.bindparam("dimensions", type_=postgresql.ARRAY(postgresql.JSON)),
    sa.bindparam("rolled_up", type_=postgresql.ARRAY(sa.BigInteger)),
)


async def insert_events(
    connection: Any, rows: Sequence[tuple[UsageEvent, int]], rolled_up: Collection[int]
) -> set[str]:
    """Insert (event, meter_seq) rows unless their id is known, and roll up those of the
    meters in `rolled_up`; the ids inserted.

    Each row's `seq` (the ingestion order `latest` breaks ties by) follows the order the
    events arrived in. On PostgreSQL the rows then go into the table in id order: two
    processes inserting overlapping batches take the unique index's locks in the same
    order, so neither waits on the other in a cycle (unsorted, they deadlocked)."""
    if connection.dialect.name == "postgresql":
        events = [event for event, _ in rows]
        result = await connection.execute(
            _POSTGRES,
            {
                "ids": [e.id for e in events],
                "meters": [seq for _, seq in rows],
                "names": [e.event_name for e in events],
                "customers": [e.customer_id for e in events],
                "times": [epoch_micros(e.timestamp) for e in events],
                "values": [e.value for e in events],
                "dimensions": [e.dimensions for e in events],
                "rolled_up": list(rolled_up),
            },
        )
        return set(result.scalars())
    payload = json.dumps(
        [
            [
                e.id,
                seq,
                e.event_name,
                e.customer_id,
                epoch_micros(e.timestamp),
                str(e.value),
                e.dimensions,
            ]
            for e, seq in rows
        ]
    )
    inserted = (await connection.execute(_SQLITE, {"rows": payload})).all()
    if inserted and rolled_up:
        seqs = [seq for _, seq in inserted]
        await connection.execute(
            _SQLITE_ROLLUPS,
            {"first": min(seqs), "last": max(seqs), "meters": json.dumps(list(rolled_up))},
        )
    return {event_id for event_id, _ in inserted}
