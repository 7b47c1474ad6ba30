"""Which meters a tenant-bound key may write, for providers that cannot judge it as they
store events: those whose usage its events can only raise.

A tenant cannot lower its own usage (docs/rest.md, tenancy). On a sum meter refusing
negative values is enough; on a `latest`, `min` or `avg` meter any event can lower it (a
later 0, a smaller value, many zeros), so a tenant-bound key may not write to one at all:
such meters are written by the operator's own components, with keys bound to no tenant.
Memory and sql judge it in the insert itself (`refuses_lowering`); for other providers the
service keeps this copy of the meters' aggregations.
"""

import time
from collections.abc import Collection

from metering_core.client import AsyncMetering
from metering_core.models import Aggregation
from metering_core.rules import LOWERED_BY_EVENTS

__all__ = ["LOWERED_BY_EVENTS", "MeterAggregations"]

STALE_AFTER = 30.0
"""Seconds a copy of the meters is trusted: a meter deleted and created again for the same
event name with another aggregation is seen within this."""

MISSING_RETRY = 1.0
"""Seconds between reads for an event name no meter has: a tenant naming one again and
again cannot make every request list the provider's meters."""


class MeterAggregations:
    """Each event name's aggregation, from a copy of the provider's meters. The copy is
    read again when it is stale, or lacks a name asked for (at most once a second), and
    dropped when a meter is created or deleted through this service, so a meter made here
    is checked from its first event."""

    def __init__(self, service: AsyncMetering) -> None:
        self._service = service
        self._by_name: dict[str, Aggregation] = {}
        self._read_at = -float("inf")
        self._generation = 0  # forgets so far: a read that overlaps one is not trusted

    def forget(self) -> None:
        """Read the meters again before the next check (one was created or deleted)."""
        self._generation += 1
        self._read_at = -float("inf")

    async def of(self, names: Collection[str]) -> dict[str, Aggregation]:
        """The aggregation of each name that has a meter. A name without one is left out:
        the provider refuses its events with its own reason (a meter made elsewhere, by
        another process on the same store, is seen within a second)."""
        age = time.monotonic() - self._read_at
        missing = not set(names) <= self._by_name.keys()
        if age > STALE_AFTER or (missing and age > MISSING_RETRY):
            began, generation = time.monotonic(), self._generation
            self._by_name = {  # a failed read raises: nothing goes through unchecked
                meter.event_name: meter.aggregation async for meter in self._service.iter_meters()
            }
            if generation == self._generation:
                self._read_at = began
        return {name: self._by_name[name] for name in names if name in self._by_name}
