"""A batch of events into the store, and its rollups, in one transaction.

The rows travel as one JSON array (unpacked by `json_each` on SQLite and by
`jsonb_array_elements` on PostgreSQL), so the cost per event is the database's, not the
driver's parameter handling. `ON CONFLICT (id) DO NOTHING RETURNING` answers with exactly
the rows this statement inserted: a known id, from this batch or any process, is left
out, and so is a duplicate. Only those rows are added to the rollups.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from decimal import Decimal, localcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from metering_core.memory.store import epoch_micros
from metering_core.models import EXACT, UsageEvent
from metering_core.sql.schema import BUCKET, events, rollups
from metering_core.sql.store import canonical_dimensions

__all__ = ["add_to_rollups", "insert_events", "rollup_deltas", "rollup_key"]

_BUCKET_OF = f"ts - ((ts % {BUCKET}) + {BUCKET}) % {BUCKET}"
"""The quarter hour an event falls in (floored: times before 1970 are negative)."""

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
        SELECT nextval(CAST('events_seq_seq' AS regclass)) AS seq,
               e->>0 AS id, CAST(e->>1 AS bigint) AS meter_seq, e->>2 AS event_name,
               e->>3 AS customer_id, CAST(e->>4 AS bigint) AS ts,
               CAST(e->>5 AS numeric) AS value, CAST(e->6 AS json) AS dimensions
        FROM (
            SELECT e FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS a(e, n)
            ORDER BY n
        ) AS sent
    ), inserted AS (
        INSERT INTO events (seq, id, meter_seq, event_name, customer_id, ts, value, dimensions)
        SELECT * FROM arrived ORDER BY id, seq
        ON CONFLICT (id) DO NOTHING
        RETURNING id, meter_seq, ts, value, dimensions
    ), rolled AS (
        INSERT INTO rollups AS r (meter_seq, bucket, digest, dimensions, count, total)
        SELECT meter_seq, bucket, md5(dimensions), dimensions, count(*), sum(value)
        FROM (
            SELECT meter_seq, {_BUCKET_OF} AS bucket,
                   CAST(CAST(dimensions AS jsonb) AS text) AS dimensions, value
            FROM inserted
            WHERE meter_seq = ANY(CAST(:rolled_up AS bigint[]))
        ) AS rolled
        GROUP BY meter_seq, bucket, dimensions
        ORDER BY meter_seq, bucket, md5(dimensions) COLLATE "C"
        ON CONFLICT (meter_seq, bucket, digest) DO UPDATE
        SET count = r.count + excluded.count, total = r.total + excluded.total
    )
    SELECT id FROM inserted
    """
)
"""Arrival order numbers the rows (`seq`, the order `latest` breaks ties by); then they
go in by id and their rollups by key: two processes writing overlapping batches take
their locks in the same order, so neither waits on the other in a cycle. An id sent
twice in the batch goes in in arrival order too (`seq` breaks the tie), so its first
copy is the one stored, as on every provider; sorted by id alone, PostgreSQL's sort
could put a later copy first, and its value was billed."""


def _payload(rows: Sequence[tuple[UsageEvent, int]]) -> str:
    return json.dumps(
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


async def insert_events(
    connection: AsyncConnection,
    rows: Sequence[tuple[UsageEvent, int]],
    rolled_up: Collection[int],
) -> set[str]:
    """Insert (event, meter_seq) rows unless their id is known, adding those of the meters
    in `rolled_up` to their rollups; the ids inserted."""
    if connection.dialect.name == "postgresql":
        parameters = {"rows": _payload(rows), "rolled_up": list(rolled_up)}
        return set((await connection.execute(_POSTGRES, parameters)).scalars())
    inserted = set((await connection.execute(_SQLITE, {"rows": _payload(rows)})).scalars())
    if inserted and rolled_up:
        # Summed here rather than by a second statement over the new rows: SQLite would
        # call back into Python for every exact decimal anyway, at twice the cost.
        counted: set[str] = set()
        kept = []
        for event, seq in rows:
            if event.id in inserted and event.id not in counted:
                counted.add(event.id)  # the first of an id is what was stored, whatever meter
                if seq in rolled_up:
                    kept.append((seq, epoch_micros(event.timestamp), event.value, event.dimensions))
        await add_to_rollups(connection, rollup_deltas(kept, sign=1))
    return inserted


def rollup_deltas(
    counted: Iterable[tuple[int, int, Decimal, Mapping[str, str] | str]], *, sign: int
) -> list[dict[str, Any]]:
    """What adding (`sign` 1) or taking away (-1) these (meter_seq, time, value,
    dimensions) events does to the rollups: one row per key, in key order. Dimensions are
    a mapping, or the key text the database made of them (`rollup_key`)."""
    grouped: dict[tuple[int, int, Any], list[Any]] = {}
    merged: dict[tuple[int, int, str], list[Any]] = {}
    with localcontext(EXACT):  # totals exact, as every provider sums
        for meter_seq, ts, value, dimensions in counted:
            # grouped by the pairs as given first: one key text per group, not per event
            pairs = dimensions if isinstance(dimensions, str) else tuple(dimensions.items())
            delta = grouped.setdefault((meter_seq, ts - ts % BUCKET, pairs), [0, Decimal(0)])
            delta[0] += sign
            delta[1] += sign * value
        for (meter_seq, bucket, pairs), (count, total) in grouped.items():
            text = pairs if isinstance(pairs, str) else canonical_dimensions(dict(pairs))
            into = merged.setdefault((meter_seq, bucket, text), [0, Decimal(0)])
            into[0] += count
            into[1] += total
    rows = [
        {
            "meter_seq": seq,
            "bucket": bucket,
            "digest": hashlib.md5(text.encode()).hexdigest(),
            "dimensions": text,
            "count": n,
            "total": total,
        }
        for (seq, bucket, text), (n, total) in merged.items()
    ]
    # the order the ingest statement locks in (byte order of the digest, as COLLATE "C")
    return sorted(rows, key=lambda row: (row["meter_seq"], row["bucket"], row["digest"]))


def rollup_key(dialect: str) -> sa.ColumnElement[str]:
    """An event's dimensions as its rollup key, in SQL: the form the ingest statement (on
    PostgreSQL, jsonb's text) or `canonical_dimensions` (on SQLite) gives."""
    if dialect == "postgresql":
        return sa.cast(sa.cast(events.c.dimensions, postgresql.JSONB), sa.Text)
    return sa.func.canonical(events.c.dimensions, type_=sa.Text)


async def add_to_rollups(connection: AsyncConnection, deltas: list[dict[str, Any]]) -> None:
    """Add `deltas` (from `rollup_deltas`) to the rollups, row by row in key order."""
    if not deltas:
        return
    statement: postgresql.Insert | sqlite.Insert
    if connection.dialect.name == "postgresql":
        statement = postgresql.insert(rollups)
        total = rollups.c.total + statement.excluded.total
    else:
        statement = sqlite.insert(rollups)
        total = sa.func.dec_add(rollups.c.total, statement.excluded.total)
        deltas = [{**delta, "total": str(delta["total"])} for delta in deltas]
    upsert = statement.on_conflict_do_update(
        index_elements=[rollups.c.meter_seq, rollups.c.bucket, rollups.c.digest],
        set_={"count": rollups.c.count + statement.excluded.count, "total": total},
    )
    await connection.execute(upsert, deltas)
