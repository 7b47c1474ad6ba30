"""The store's clock, read on this host. Forwarders on several hosts mark when they
delivered and how long they lease rows; a reconcile on yet another host compares those
marks with when it asked the mirror. Each host's own clock may be minutes off, or hours
off when one is set to local time, and a cell delivered to an hour ago then reads as
settled and is repaired while Stripe still processes it: the correction is billed beside
the events. So marks and the times compared with them are the store's. PostgreSQL's
clock is read with one query a `REFRESH` (to half a round trip); SQLite's store is on
this host, whose clock it is."""

from __future__ import annotations

import time
from datetime import datetime

import sqlalchemy as sa

from metering_core.epoch import from_epoch_micros
from metering_core.sql.rows import Transaction

__all__ = ["REFRESH", "StoreClock", "store_now"]

REFRESH = 30.0
"""Seconds the store's clock is carried on by this host's steady one before it is read
again (which drifts from it by parts per million)."""

_POSTGRES_MICROS = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)"
_POSTGRES_NOW = sa.text(f"SELECT {_POSTGRES_MICROS}")


def store_now(dialect: str) -> sa.ColumnElement[int]:
    """The store's time as SQL, for a statement to stamp a row with (where no
    `StoreClock` can be read: while the store is being opened)."""
    if dialect == "postgresql":
        return sa.literal_column(_POSTGRES_MICROS, sa.BigInteger)
    return sa.literal(host_micros(), sa.BigInteger)


_STEADY = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _elapsed_ns() -> int:
    """Nanoseconds on a clock no one sets: Linux's boot time, which counts a suspended
    host's or VM's sleep as the store's clock does (the monotonic clock stops, and a
    store clock carried by it would lag by the sleep until read again: review)."""
    return time.clock_gettime_ns(_STEADY)


def host_micros() -> int:
    """This host's clock, in microseconds since the epoch."""
    return time.time_ns() // 1000


class StoreClock:
    """The store's time: a PostgreSQL server's, read through `transaction` once a
    `REFRESH` and carried on by this host's steady clock meanwhile (so a step of this
    host's clock, NTP's or an operator's, moves nothing); with no transaction the store
    is this host's (SQLite), whose clock is read alone, no connection opened for it."""

    def __init__(self, transaction: Transaction | None = None) -> None:
        self._transaction = transaction
        self._measured = 0  # the store's micros when measured,
        self._measured_at: int | None = None  # at this steady nanosecond

    async def micros(self) -> int:
        """The store's time now, in microseconds since the epoch."""
        if self._transaction is None:
            return host_micros()
        since = None if self._measured_at is None else _elapsed_ns() - self._measured_at
        if since is None or since >= REFRESH * 1e9:
            await self._measure(self._transaction)
            return self._measured
        return self._measured + since // 1000

    async def now(self) -> datetime:
        """The store's time now, as a UTC instant."""
        return from_epoch_micros(await self.micros())

    async def _measure(self, transaction: Transaction) -> None:
        async with transaction(writes=False) as connection:
            before = _elapsed_ns()
            stored = int(await connection.scalar(_POSTGRES_NOW))
            after = _elapsed_ns()
        self._measured, self._measured_at = stored, (before + after) // 2
