"""A batch of events into the store in one statement.

The rows travel as one JSON array (SQLite, unpacked by `json_each`) or as one array per
column (PostgreSQL, unpacked by `unnest`), so the cost per event is the database's, not
the driver's parameter handling. `ON CONFLICT (id) DO NOTHING RETURNING id` answers with
exactly the ids this statement inserted: a known id, from this batch or any process, is
left out, and so is a duplicate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from metering_core.memory.store import epoch_micros
from metering_core.models import UsageEvent

__all__ = ["insert_events"]

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
    RETURNING id
    """
)

_POSTGRES = sa.text(
    """
    WITH arrived AS MATERIALIZED (
        SELECT nextval(pg_get_serial_sequence('events', 'seq')) AS seq, u.*
        FROM unnest(:ids, :meters, :names, :customers, :times, :values, :dimensions)
            AS u (id, meter_seq, event_name, customer_id, ts, value, dimensions)
    )
    INSERT INTO events (seq, id, meter_seq, event_name, customer_id, ts, value, dimensions)
    SELECT * FROM arrived ORDER BY id
    ON CONFLICT (id) DO NOTHING
    RETURNING id
    """
).bindparams(
    sa.bindparam("ids", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("meters", type_=postgresql.ARRAY(sa.BigInteger)),
    sa.bindparam("names", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("customers", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("times", type_=postgresql.ARRAY(sa.BigInteger)),
    sa.bindparam("values", type_=postgresql.ARRAY(sa.Numeric)),
    sa.bindparam("dimensions", type_=postgresql.ARRAY(postgresql.JSON)),
)


async def insert_events(connection: Any, rows: Sequence[tuple[UsageEvent, int]]) -> set[str]:
    """Insert (event, meter_seq) rows unless their id is known; the ids inserted.

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
            },
        )
    else:
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
        result = await connection.execute(_SQLITE, {"rows": payload})
    return set(result.scalars())
