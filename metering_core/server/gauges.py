"""Which meters a tenant-bound key may write: those whose usage its events can only raise.

A tenant cannot lower its own usage (DESIGN: Event identity and tenancy). On a sum meter
refusing negative values is enough; on a `latest`, `min` or `avg` meter any event can lower
it (a later 0, a smaller value, many zeros), so a tenant-bound key may not write to one at
all: such meters are written by the operator's own components, with keys bound to no
tenant.
"""

import time
from collections.abc import Callable, Collection

from metering_core.client import AsyncMetering
from metering_core.errors import RateLimitedError
from metering_core.models import Aggregation

__all__ = ["LOWERED_BY_EVENTS", "MeterAggregations"]

LOWERED_BY_EVENTS = frozenset({Aggregation.LATEST, Aggregation.MIN, Aggregation.AVG})

STALE_AFTER = 30.0
"""Seconds a copy of the meters is trusted: a meter deleted and created again for the same
event name with another aggregation is seen within this."""

MISSING_RETRY = 1.0
"""Seconds between reads for an event name no meter has: a tenant naming one again and
again cannot make every request list the provider's meters."""


class MeterAggregations:
    """Each event name's aggregation, from a copy of the provider's meters read again when
    it is stale or lacks a name asked for; for lacking names, at most once a second."""

    def __init__(self, service: AsyncMetering, clock: Callable[[], float] = time.monotonic) -> None:
        self._service = service
        self._clock = clock
        self._by_name: dict[str, Aggregation] = {}
        self._read_at = -float("inf")

    async def of(self, names: Collection[str]) -> dict[str, Aggregation]:
        """The aggregation of each name that has a meter (names without one are left out:
        the provider refuses their events with its own reason). A name the copy lacks
        within a second of reading it is answered 429, retry in a second, never let
        through unchecked: it may be a meter created since."""
        age = self._clock() - self._read_at
        missing = not set(names) <= self._by_name.keys()
        if missing and age <= MISSING_RETRY:
            raise RateLimitedError(
                f"event names {sorted(set(names) - self._by_name.keys())!r} have no meter "
                "known to the service yet: retry in a second",
                provider=self._service.provider_name,
                retry_after=MISSING_RETRY,
            )
        if missing or age > STALE_AFTER:
            began = self._clock()  # a failed read raises: nothing goes through unchecked
            self._by_name = {
                meter.event_name: meter.aggregation async for meter in self._service.iter_meters()
            }
            self._read_at = began
        return {name: self._by_name[name] for name in names if name in self._by_name}
