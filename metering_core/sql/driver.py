"""The driver beneath SQLAlchemy, for the store's hot paths: on SQLite a statement sent
straight to it costs one trip to aiosqlite's thread, and its rows are the driver's own
tuples, where SQLAlchemy's Row objects cost about 2 µs each (a fifth of a forwarder's
pass); on PostgreSQL, asyncpg's own call costs less than half of SQLAlchemy's."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

__all__ = ["POOLED", "Aiosqlite", "Asyncpg", "mark_pooled", "rows_of"]

_POOLED_BEFORE = "metering.pooled_before"
"""Marks, in a connection's `info`, one the pool has taken back at least once: one that
may have gone stale there, where a new one cannot have."""

POOLED = 16
"""More connections than a pool of the store holds (SQLAlchemy's 5 and 10 overflow): a
pool a restarted server left dead is passed through whole, one connection at a time."""


class Aiosqlite:
    """The aiosqlite connection under a SQLAlchemy connection. Each of its calls is one
    trip to its thread, where a statement through SQLAlchemy's adapter is three or four
    (cursor, execute, fetch, close): on SQLite, where a statement of 500 rows takes about
    a millisecond, the trips were a third of ingest.

    Statements share the SQLAlchemy transaction because sqlite3, in its default mode,
    opens one before the first write (a read before it, as the meter lookup, runs in
    none, as it did through SQLAlchemy): do not put these connections in autocommit.
    aiosqlite reports a closed connection as ValueError; here it is sqlite3's error, as
    SQLAlchemy's adapter would have raised, for `store_error` to name."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    @classmethod
    async def under(cls, connection: AsyncConnection) -> Aiosqlite:
        return cls((await connection.get_raw_connection()).driver_connection)

    async def fetchall(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        try:
            return list(await self._driver.execute_fetchall(sql, parameters))
        except ValueError as exc:
            raise sqlite3.OperationalError(f"connection closed: {exc}") from exc

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            await self._driver.executemany(sql, rows)
        except ValueError as exc:
            raise sqlite3.OperationalError(f"connection closed: {exc}") from exc


class Asyncpg:
    """A pooled PostgreSQL connection used raw, outside any transaction: each statement
    commits alone. A one-event write through SQLAlchemy cost about 450 µs of this
    process's time (the connection's setup, its result's machinery, the adapter's hops
    between greenlets), and straight through asyncpg 210 µs: the same statement, on the
    same pool. Under a service's load that difference was most of what a request cost
    above the plain ceiling (`benchmarks/bench_service.py`).

    A connection is not pinged on checkout (a round trip each); one the server has closed
    is known to asyncpg without one (it read the close) and is passed over. A connection
    found closed by a statement is dropped from the pool, and the failure raised as
    SQLAlchemy raises it, a `DBAPIError` marked `connection_invalidated`, for the caller
    to write again on another connection. (SQLAlchemy, finding one connection dead,
    drops the whole pool with a private call; here each is dropped as it is found.) Only
    a connection that had been in the pool is reported so (`mark_pooled`): a new one
    lost under its statement is the server failing that statement (a crash it causes,
    say), and its error is raised as it is, not written again."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    @classmethod
    @asynccontextmanager
    async def checkout(cls, engine: AsyncEngine) -> AsyncIterator[Asyncpg]:
        pooled = await _open(engine)
        driver: Any = pooled.driver_connection
        pooled_before = pooled.info.get(_POOLED_BEFORE, False)
        try:
            yield cls(driver)
        except Exception as exc:
            if not driver.is_closed():
                raise
            await greenlet_spawn(pooled.invalidate, exc)
            if not pooled_before:  # a new connection lost under its statement: none stale
                raise
            raise sa.exc.DBAPIError(
                None, None, exc, hide_parameters=True, connection_invalidated=True
            ) from exc
        except BaseException:  # cancelled mid-statement: not pooled again in an unknown state
            pooled.invalidate()  # closed at once, awaiting nothing
            raise
        finally:
            await greenlet_spawn(pooled.close)

    async def fetchrow(self, sql: str, *parameters: Any) -> Any:
        return await self._driver.fetchrow(sql, *parameters)

    async def fetchval(self, sql: str, *parameters: Any) -> Any:
        return await self._driver.fetchval(sql, *parameters)


def mark_pooled(engine: AsyncEngine) -> None:
    """Have the pool mark each connection it takes back, for `Asyncpg` to tell one that
    may have gone stale in the pool from a new one."""
    sa.event.listen(engine.sync_engine, "checkin", _taken_back)


def _taken_back(dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info[_POOLED_BEFORE] = True


async def _open(engine: AsyncEngine) -> PoolProxiedConnection:
    """A pooled connection asyncpg has not seen closed (the dead ones are dropped)."""
    for _ in range(POOLED):
        pooled = await _connection(engine)
        driver: Any = pooled.driver_connection
        if not driver.is_closed():
            return pooled
        await greenlet_spawn(pooled.invalidate)
        await greenlet_spawn(pooled.close)
    return pooled  # the server closes every connection: the statement will say so


async def _connection(engine: AsyncEngine) -> PoolProxiedConnection:
    """One from the pool; a new one the server refuses (starting up, too many clients, a
    password changed) raised as SQLAlchemy raises it from a statement, so the store names
    it as it names any other failure (a raw checkout passes the adapter's error through)."""
    dbapi = engine.dialect.loaded_dbapi
    try:
        return await engine.raw_connection()
    except dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(None, None, exc, dbapi.Error) from exc


async def rows_of(
    connection: AsyncConnection,
    statement: sa.TextClause,
    parameters: Mapping[str, Any],
    *,
    alone: bool = False,
) -> Sequence[Sequence[Any]]:
    """The rows of a text statement (named `:parameters`), from the driver beneath
    `connection`: sqlite3's tuples, asyncpg's records (each a sequence of its columns).
    On SQLite in the connection's transaction. On PostgreSQL SQLAlchemy begins the
    driver's transaction at its own first statement, so a statement sent around it before
    then runs in none: it goes straight to asyncpg once SQLAlchemy has begun, or when the
    caller says it may run `alone` (a plain read: under READ COMMITTED it sees what it
    would in a transaction); else through SQLAlchemy. Its Row objects had been a sixth of
    a forwarder's time."""
    if connection.dialect.name == "sqlite":
        return await (await Aiosqlite.under(connection)).fetchall(statement.text, parameters)
    raw: Any = (await connection.get_raw_connection()).driver_connection
    if not (alone or raw.is_in_transaction()):
        return (await connection.execute(statement, parameters)).all()
    sql, names = _positional(statement.text, connection.dialect)
    try:
        records: list[Any] = await raw.fetch(sql, *(parameters[name] for name in names))
    except Exception as exc:
        if raw.is_closed():  # as SQLAlchemy would: the connection is not pooled again
            await connection.invalidate(exc)
        raise
    return records


@functools.lru_cache(maxsize=64)
def _positional(sql: str, dialect: sa.Dialect) -> tuple[str, tuple[str, ...]]:
    """A text statement as its driver takes it ($1, $2, …), and its parameters' names in
    that order."""
    compiled = sa.text(sql).compile(dialect=dialect)
    return compiled.string, tuple(compiled.positiontup or ())
