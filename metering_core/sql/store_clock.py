"""The store's clock, read on this host. Forwarders on several hosts mark when they
delivered and how long they lease rows; a reconcile on yet another host compares those
marks with when it asked the mirror. Each host's own clock may be minutes off, or hours
off when one is set to local time, and a cell delivered to an hour ago then reads as
settled and is repaired while Stripe still processes it: the correction is billed beside
the events. So marks and the times compared with them are the store's. PostgreSQL's
clock is measured with one query a `REFRESH` (its offset from this host's, to half a
round trip); SQLite's store is on this host, whose clock it is."""

from __future__ import annotations

import time
from datetime import datetime

import sqlalchemy as sa

from metering_core.epoch import from_epoch_micros
from metering_core.sql.rows import Transaction

__all__ = ["REFRESH", "StoreClock"]

REFRESH = 30.0
"""Seconds an offset measured is trusted before it is measured again (a host's clock
stepped by NTP is followed within this)."""

_POSTGRES_NOW = sa.text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)")


def host_micros() -> int:
    """This host's clock, in microseconds since the epoch."""
    return time.time_ns() // 1000


class StoreClock:
    """The store's time, as this host's clock plus the offset last measured."""

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction
        self._offset = 0
        self._measured_until = float("-inf")  # monotonic: when to measure again

    async def micros(self) -> int:
        """The store's time now, in microseconds since the epoch."""
        if time.monotonic() >= self._measured_until:
            await self._measure()
        return host_micros() + self._offset

    async def now(self) -> datetime:
        """The store's time now, as a UTC instant."""
        return from_epoch_micros(await self.micros())

    async def _measure(self) -> None:
        async with self._transaction(writes=False) as connection:
            if connection.dialect.name == "postgresql":
                before = host_micros()
                stored = int(await connection.scalar(_POSTGRES_NOW))
                after = host_micros()
                self._offset = stored - (before + after) // 2
        self._measured_until = time.monotonic() + REFRESH
