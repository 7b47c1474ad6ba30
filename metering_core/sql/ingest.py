"""A batch of events into the store, and its rollups, in one transaction.

The rows travel as one JSON array (SQLite, unpacked by `json_each`) or as one array per
column (PostgreSQL, unpacked by `unnest`), so the cost per event is the database's, not
the driver's parameter handling. `ON CONFLICT (id) DO NOTHING RETURNING` answers with
exactly the rows this statement inserted: a known id, from this batch or any process, is
left out, and so is a duplicate. The rollups of a batch are made from those rows alone.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from decimal import Decimal, localcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from metering_core.memory.store import epoch_micros
from metering_core.models import EXACT, UsageEvent
from metering_core.sql.schema import HOUR, rollups

__all__ = ["insert_events", "rollup_deltas"]

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
    RETURNING id
    """
)

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
    inserted = set((await connection.execute(_SQLITE, {"rows": payload})).scalars())
    if inserted and rolled_up:
        # Summed here rather than by a second statement over the new rows: SQLite would
        # call back into Python for every exact decimal anyway, at twice the cost.
        counted: set[str] = set()
        kept = []
        for event, seq in rows:
            if seq in rolled_up and event.id in inserted and event.id not in counted:
                counted.add(event.id)  # a repeat in the batch was not inserted: the first was
                kept.append((seq, epoch_micros(event.timestamp), event.value, event.dimensions))
        deltas = rollup_deltas(kept, sign=1, native=False)
        if deltas:
            await connection.execute(rollups.insert(), deltas)
    return inserted


def rollup_deltas(
    counted: Iterable[tuple[int, int, Decimal, Any]], *, sign: int, native: bool
) -> list[dict[str, Any]]:
    """Rollup rows adding (`sign` 1) or taking away (-1) these (meter_seq, time, value,
    dimensions) events: one row per meter, UTC hour and dimensions. Dimensions may be
    stored JSON text or a mapping; queries read their values, never compare the text."""
    deltas: dict[tuple[int, int, str], list[Any]] = {}
    with localcontext(EXACT):  # totals exact, as every provider sums
        for meter_seq, ts, value, dimensions in counted:
            text = dimensions if isinstance(dimensions, str) else json.dumps(dimensions)
            delta = deltas.setdefault((meter_seq, ts - ts % HOUR, text), [0, Decimal(0)])
            delta[0] += sign
            delta[1] += sign * Decimal(value)
    return [
        {
            "meter_seq": meter_seq,
            "hour": hour,
            "dimensions": text,
            "count": count,
            "total": total if native else str(total),
        }
        for (meter_seq, hour, text), (count, total) in deltas.items()
    ]
