"""A batch of events into the store, and its rollups, in one transaction.

On PostgreSQL the rows travel as one JSON array (unpacked by `jsonb_array_elements`), so
the cost per event is the server's, not asyncpg's parameter handling, and the rollups
are added by the same statement. On SQLite they are the parameters of one multi-row
INSERT, sent straight through aiosqlite, and their rollups are summed here. Either way
`ON CONFLICT (id) DO NOTHING RETURNING` answers with exactly the rows inserted: a known
id, from this batch or any process, is left out, and so is a duplicate. Only those rows
are added to the rollups.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from decimal import Decimal, localcontext
from typing import Any, NamedTuple

import pydantic_core
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from metering_core.epoch import epoch_micros
from metering_core.models import EXACT, UsageEvent
from metering_core.sql.driver import Aiosqlite, Asyncpg
from metering_core.sql.schema import BUCKET, events, meters, outbox, rollups
from metering_core.sql.store import canonical_dimensions

__all__ = [
    "Checked",
    "EventMeter",
    "add_to_rollups",
    "insert_events",
    "insert_events_checked",
    "meters_named",
    "owe",
    "rollup_deltas",
    "rollup_key",
]

_BUCKET_OF = f"ts - ((ts % {BUCKET}) + {BUCKET}) % {BUCKET}"
"""The quarter hour an event falls in (floored: times before 1970 are negative)."""

_SQLITE_ROWS = 500
"""Rows per INSERT on SQLite: 4,000 parameters, well under its limit of 32,766."""


@functools.lru_cache(maxsize=8)
def _sqlite_insert(count: int) -> str:
    """An INSERT of `count` rows given as parameters (bound by the driver in C, where
    unpacking a JSON array in SQL parsed each row seven times)."""
    return (
        "INSERT INTO events "
        "(id, meter_seq, event_name, customer_id, ts, value, dimensions, ingested_at) "
        f"VALUES {', '.join(['(?, ?, ?, ?, ?, ?, ?, ?)'] * count)} "
        "ON CONFLICT (id) DO NOTHING RETURNING id, seq"
    )


@functools.lru_cache(maxsize=8)
def _sqlite_owe(count: int) -> str:
    """An INSERT of `count` outbox rows of one mirror, kind and time (?1, ?2, ?3), the ids
    given one parameter each: one statement per 500 rows, where executemany ran one per
    row (measured alone: 1.2 µs a row against 3.0)."""
    ids = ", ".join(f"(?{n})" for n in range(4, count + 4))
    return (
        "INSERT INTO outbox (mirror, kind, event_id, created_at) "
        f"SELECT ?1, ?2, column1, ?3 FROM (VALUES {ids})"
    )


@functools.lru_cache(maxsize=8)
def _sqlite_owe_usage(count: int) -> str:
    """As `_sqlite_owe` for stored events of one mirror and time (?1, ?2): each an (id,
    seq) pair of parameters."""
    pairs = ", ".join(f"(?{n}, ?{n + 1})" for n in range(3, 2 * count + 3, 2))
    return (
        "INSERT INTO outbox (mirror, kind, event_id, event_seq, created_at) "
        f"SELECT ?1, 'usage', column1, column2, ?2 FROM (VALUES {pairs})"
    )


_SQLITE_ROLLUP = (
    "INSERT INTO rollups (meter_seq, bucket, digest, dimensions, count, total) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (meter_seq, bucket, digest) DO UPDATE "
    "SET count = count + excluded.count, total = dec_add(total, excluded.total)"
)

_CHECKED_PARAMETERS = ("rows", "rolled_up", "ingested", "meters", "unmetered", "mirrors")
"""The checked insert's parameters, in asyncpg's order ($1, $2, …)."""


def _fresh(parameter: Callable[[str], str]) -> str:
    """Whether the meters ingest judged the rows by are the store's now: each as it was
    read (the fields the rules read), and no meter for the names that had none. Each is
    looked up by its key in a subquery of its own, which a plan keeps as an index lookup
    however few meters the store held when it was made (a join was planned as a hash of
    the whole table, kept as the table grew: 36 ms a write over 100,000 meters)."""
    meters = parameter("meters")
    return f"""
    fresh AS (
        SELECT (
            SELECT count(*)
            FROM jsonb_to_recordset(CAST({meters} AS jsonb))
                AS c(seq bigint, event_name text, id text, unique_dimension text,
                     aggregation text)
            WHERE (
                SELECT m.event_name = c.event_name AND m.id = c.id
                       AND m.unique_dimension IS NOT DISTINCT FROM c.unique_dimension
                       AND m.aggregation = c.aggregation
                FROM meters AS m WHERE m.seq = c.seq
            )
        ) = jsonb_array_length(CAST({meters} AS jsonb))
        AND NOT EXISTS (
            SELECT 1 FROM unnest(CAST({parameter("unmetered")} AS text[])) AS u(name)
            WHERE (SELECT true FROM meters WHERE event_name = u.name)
        ) AS ok
    ),"""


def _postgres_insert(checked: bool) -> str:
    """The rows, their rollups and what they owe the mirrors in one statement (SQL text).
    `checked`: only if `_fresh` holds, and answering whether it did: one round trip, run
    outside a transaction (one statement is one), its parameters asyncpg's positional
    ones; unchecked, SQLAlchemy's named ones.

    The mirrors travel as JSON, not as an array, and the refused ids are looked up apart
    (`insert_events_checked`): a plan for the values at hand knows an array's length and
    a generic plan does not, so with them every plan for its values looked cheaper, and
    PostgreSQL planned the statement again at every write (0.3 ms, as long as a one-event
    write's work). Now the generic plan is kept after PostgreSQL's five trials. Its
    inserts go by unique key whatever the tables hold, and the meters are looked up by
    key, one subquery each (`_fresh`), where a join hashed the whole table: a plan made
    on a new store stays good as it grows. (One made just after an analyze of a handful
    of meters scans them instead, until autovacuum analyzes them again.)

    Text is sorted and grouped by its bytes (`COLLATE "C"`): any one order keeps writers
    from waiting on each other in a cycle, and the database's own collation compares
    each pair through the C library. The rollups are keyed by the dimensions' stored
    text, which is jsonb's own (`rollup_key`): it was written from the jsonb the row
    arrived as, so it is not parsed again. The two saved 0.3 ms of the server's 7 in a
    write of 500 events."""

    def parameter(name: str) -> str:
        return f"${_CHECKED_PARAMETERS.index(name) + 1}" if checked else f":{name}"

    guard = "WHERE (SELECT ok FROM fresh)" if checked else ""
    answer = (
        "SELECT (SELECT ok FROM fresh) AS fresh, ARRAY(SELECT id FROM inserted) AS inserted"
        if checked
        else "SELECT id FROM inserted"
    )
    return f"""
        WITH {_fresh(parameter) if checked else ""} arrived AS MATERIALIZED (
            SELECT nextval(CAST('events_seq_seq' AS regclass)) AS seq, n,
                   e->>0 AS id, CAST(e->>1 AS bigint) AS meter_seq, e->>2 AS event_name,
                   e->>3 AS customer_id, CAST(e->>4 AS bigint) AS ts,
                   CAST(e->>5 AS numeric) AS value, CAST(e->6 AS json) AS dimensions
            FROM (
                SELECT e, n
                FROM jsonb_array_elements(CAST({parameter("rows")} AS jsonb))
                    WITH ORDINALITY AS a(e, n)
                {guard}
                ORDER BY n
            ) AS sent
        ), inserted AS (
            INSERT INTO events
                (seq, id, meter_seq, event_name, customer_id, ts, value, dimensions, ingested_at)
            SELECT seq, id, meter_seq, event_name, customer_id, ts, value, dimensions,
                   CAST({parameter("ingested")} AS bigint)
            FROM arrived ORDER BY id COLLATE "C", n
            ON CONFLICT (id) DO NOTHING
            RETURNING seq, id, meter_seq, ts, value, dimensions
        ), rolled AS (
            INSERT INTO rollups AS r (meter_seq, bucket, digest, dimensions, count, total)
            SELECT meter_seq, bucket, md5(dimensions), dimensions, count(*), sum(value)
            FROM (
                SELECT meter_seq, {_BUCKET_OF} AS bucket,
                       CAST(dimensions AS text) COLLATE "C" AS dimensions, value
                FROM inserted
                WHERE meter_seq = ANY(CAST({parameter("rolled_up")} AS bigint[]))
            ) AS rolled
            GROUP BY meter_seq, bucket, dimensions
            ORDER BY meter_seq, bucket, md5(dimensions) COLLATE "C"
            ON CONFLICT (meter_seq, bucket, digest) DO UPDATE
            SET count = r.count + excluded.count, total = r.total + excluded.total
        ), owed AS (
            INSERT INTO outbox (mirror, kind, event_id, event_seq, created_at)
            SELECT mirror, 'usage', id, seq, CAST({parameter("ingested")} AS bigint)
            FROM inserted CROSS JOIN
                jsonb_array_elements_text(CAST({parameter("mirrors")} AS jsonb)) AS m(mirror)
            ORDER BY id COLLATE "C", mirror
        )
        {answer}
        """


_POSTGRES = sa.text(_postgres_insert(checked=False))
"""Arrival order numbers the rows (`seq`, the outbox's order); then they
go in by id and their rollups by key: two processes writing overlapping batches take
their locks in the same order, so neither waits on the other in a cycle (a process of
an older version sorted ids by the database's collation: while both run, PostgreSQL may
roll a group back, and it is written again, `SqlProvider._write_group`). An id sent
twice in the batch goes in in arrival order too (its place in the array breaks the
tie), so its first copy is the one stored, as on every provider; sorted by id alone,
PostgreSQL's sort could put a later copy first, and its value was billed."""

_POSTGRES_CHECKED = _postgres_insert(checked=True)

_KNOWN = "SELECT ARRAY(SELECT id FROM events WHERE id = ANY(CAST($1 AS text[])))"


def _payload(rows: Sequence[tuple[UsageEvent, int]]) -> str:
    """The rows as the JSON array the statement unpacks. pydantic's serializer writes it
    four times as fast as `json.dumps` (a tenth of the service's time at batches of 500),
    and a `Decimal` as the text of `str`, which `numeric` reads exactly."""
    return pydantic_core.to_json(
        [
            [
                e.id,
                seq,
                e.event_name,
                e.customer_id,
                epoch_micros(e.timestamp),
                e.value,
                e.dimensions,
            ]
            for e, seq in rows
        ]
    ).decode()


class EventMeter(NamedTuple):
    """What ingest needs of the meter of an event name."""

    seq: int
    event_name: str
    id: str
    unique_dimension: str | None
    aggregation: str


_EVENT_METERS = sa.select(
    meters.c.seq, meters.c.event_name, meters.c.id, meters.c.unique_dimension, meters.c.aggregation
)


async def meters_named(
    connection: AsyncConnection, names: Collection[str]
) -> dict[str, EventMeter]:
    """The meters of these event names (at most a batch's worth), by event name."""
    if connection.dialect.name == "postgresql":
        found: Iterable[Any] = await connection.execute(
            _EVENT_METERS.where(meters.c.event_name.in_(names))
        )
    else:
        driver = await Aiosqlite.under(connection)
        found = await driver.fetchall(
            "SELECT seq, event_name, id, unique_dimension, aggregation FROM meters "
            f"WHERE event_name IN ({', '.join('?' * len(names))})",
            tuple(names),
        )
    return {row[1]: EventMeter(*row) for row in found}


async def insert_events(
    connection: AsyncConnection,
    rows: Sequence[tuple[UsageEvent, int]],
    rolled_up: Collection[int],
    mirrors: Sequence[str] = (),
    *,
    ingested: int,
) -> set[str]:
    """Insert (event, meter_seq) rows unless their id is known, adding those of the meters
    in `rolled_up` to their rollups, and owing each inserted event to each of `mirrors`
    (the outbox); the ids inserted. Each row is stamped `ingested`, when it was stored
    by the store's clock (a backfill compares it with when a mirror was added)."""
    if connection.dialect.name == "postgresql":
        parameters = {
            "rows": _payload(rows),
            "rolled_up": list(rolled_up),
            "ingested": ingested,
            "mirrors": json.dumps(mirrors),
        }
        return set((await connection.execute(_POSTGRES, parameters)).scalars())
    texts: dict[tuple[tuple[str, str], ...], str] = {}  # few sets of dimensions repeat
    records = []
    for event, seq in rows:
        pairs = tuple(event.dimensions.items())
        text = texts.get(pairs)
        if text is None:
            text = texts[pairs] = _dimensions_json(event.dimensions)
        micros = epoch_micros(event.timestamp)
        value = str(event.value)
        records.append(
            (event.id, seq, event.event_name, event.customer_id, micros, value, text, ingested)
        )
    driver = await Aiosqlite.under(connection)
    inserted: dict[str, int] = {}  # id -> its seq in `events`
    for start in range(0, len(records), _SQLITE_ROWS):
        part = records[start : start + _SQLITE_ROWS]
        flat = tuple(itertools.chain.from_iterable(part))
        inserted.update(await driver.fetchall(_sqlite_insert(len(part)), flat))
    if inserted and rolled_up:
        # Summed here rather than by a second statement over the new rows: SQLite would
        # call back into Python for every exact decimal anyway, at twice the cost.
        counted: set[str] = set()
        kept = []
        for (event, seq), record in zip(rows, records, strict=True):
            if event.id in inserted and event.id not in counted:
                counted.add(event.id)  # the first of an id is what was stored, whatever meter
                if seq in rolled_up:
                    kept.append((seq, record[4], event.value, event.dimensions))
        await add_to_rollups(connection, rollup_deltas(kept, sign=1))
    if inserted and mirrors:
        stored = sorted(inserted.items(), key=_SEQ_OF)  # the order they lie in `events`
        for mirror in mirrors:
            for start in range(0, len(stored), _SQLITE_ROWS):
                owing = stored[start : start + _SQLITE_ROWS]
                owed = (mirror, ingested, *itertools.chain.from_iterable(owing))
                await driver.fetchall(_sqlite_owe_usage(len(owing)), owed)
    return set(inserted)


_SEQ_OF = operator.itemgetter(1)


async def owe(
    connection: AsyncConnection,
    kind: str,
    event_ids: Collection[str],
    mirrors: Sequence[str],
    *,
    at: int,
) -> None:
    """Owe each mirror these events' cancellation (`kind` "cancel"), or a meter's or a
    customer's change, in the transaction that made it (stored events are owed as they
    are inserted, with their seq)."""
    if not event_ids or not mirrors:
        return
    if connection.dialect.name != "postgresql":  # straight through aiosqlite, as the events
        driver = await Aiosqlite.under(connection)
        ids = list(event_ids)
        for mirror in mirrors:
            for start in range(0, len(ids), _SQLITE_ROWS):
                part = ids[start : start + _SQLITE_ROWS]
                await driver.fetchall(_sqlite_owe(len(part)), (mirror, kind, at, *part))
        return
    rows = [(mirror, kind, event_id, at) for event_id in event_ids for mirror in mirrors]
    await connection.execute(
        sa.insert(outbox),
        [dict(zip(("mirror", "kind", "event_id", "created_at"), row, strict=True)) for row in rows],
    )


class Checked(NamedTuple):
    """What a checked insert did: whether the meters were fresh (if not, nothing was
    written), the ids inserted, and which of the refused ids the store knew before."""

    fresh: bool
    inserted: set[str]
    known: set[str]


async def insert_events_checked(
    driver: Asyncpg,
    rows: Sequence[tuple[UsageEvent, int]],
    rolled_up: Collection[int],
    *,
    judged_by: Collection[EventMeter],
    unmetered: Collection[str],
    refused: Collection[str],
    mirrors: Sequence[str] = (),
    ingested: int,
) -> Checked:
    """`insert_events` on PostgreSQL in one autocommitted statement, written only if the
    meters the rows were judged by (`judged_by`; no meter for the names `unmetered`) are
    still the store's: a copy of the meters kept in this process is checked by the
    insert itself, so no other process's change can be missed."""
    given = {
        "rows": _payload(rows),
        "rolled_up": list(rolled_up),
        "ingested": ingested,
        "meters": json.dumps([meter._asdict() for meter in judged_by]),
        "unmetered": list(unmetered),
        "mirrors": json.dumps(mirrors),
    }
    # Looked up before the write, and only when there are any: in the statement, this
    # lookup made every plan for its values look cheaper than a generic one, and
    # PostgreSQL planned it every time. An id another writer stores between the two is
    # answered rejected for this copy, as a moment earlier; it is stored once either way.
    known: list[str] = await driver.fetchval(_KNOWN, list(refused)) if refused else []
    fresh, inserted = await driver.fetchrow(
        _POSTGRES_CHECKED, *(given[name] for name in _CHECKED_PARAMETERS)
    )
    return Checked(fresh, set(inserted), set(known))


_dimensions_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""An event's dimensions as the text stored (compact, as SQLite's own JSON functions write)."""


def rollup_deltas(
    counted: Iterable[tuple[int, int, Decimal, Mapping[str, str] | str]], *, sign: int
) -> list[dict[str, Any]]:
    """What adding (`sign` 1) or taking away (-1) these (meter_seq, time, value,
    dimensions) events does to the rollups: one row per key, in key order. Dimensions are
    a mapping, or the key text the database made of them (`rollup_key`)."""
    grouped: dict[tuple[int, int, Any], list[Decimal]] = {}
    for meter_seq, ts, value, dimensions in counted:
        # grouped by the pairs as given first: one key text per group, not per event
        pairs = dimensions if isinstance(dimensions, str) else tuple(dimensions.items())
        key = (meter_seq, ts - ts % BUCKET, pairs)
        values = grouped.get(key)
        if values is None:
            grouped[key] = [value]
        else:
            values.append(value)
    merged: dict[tuple[int, int, tuple[str, str]], list[Any]] = {}
    keys: dict[Any, tuple[str, str]] = {}  # pairs -> (key text, its MD5), once per call
    with localcontext(EXACT):  # totals exact, as every provider sums
        for (meter_seq, bucket, pairs), values in grouped.items():
            named = keys.get(pairs)
            if named is None:
                text = pairs if isinstance(pairs, str) else canonical_dimensions(dict(pairs))
                named = keys[pairs] = (text, hashlib.md5(text.encode()).hexdigest())
            into = merged.setdefault((meter_seq, bucket, named), [0, Decimal(0)])
            into[0] += sign * len(values)
            into[1] += sign * sum(values, Decimal(0))
    rows = [
        {
            "meter_seq": seq,
            "bucket": bucket,
            "digest": digest,
            "dimensions": text,
            "count": n,
            "total": total,
        }
        for (seq, bucket, (text, digest)), (n, total) in merged.items()
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
    if connection.dialect.name != "postgresql":
        driver = await Aiosqlite.under(connection)
        await driver.executemany(
            _SQLITE_ROLLUP,
            [
                (
                    d["meter_seq"],
                    d["bucket"],
                    d["digest"],
                    d["dimensions"],
                    d["count"],
                    str(d["total"]),
                )
                for d in deltas
            ],
        )
        return
    statement = postgresql.insert(rollups)
    upsert = statement.on_conflict_do_update(
        index_elements=[rollups.c.meter_seq, rollups.c.bucket, rollups.c.digest],
        set_={
            "count": rollups.c.count + statement.excluded.count,
            "total": rollups.c.total + statement.excluded.total,
        },
    )
    await connection.execute(upsert, deltas)
