"""Storage of the memory provider: one time-sorted column set per (meter, customer)."""

from __future__ import annotations

import bisect
from array import array
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from metering_core.models import UsageEvent

__all__ = ["Series", "epoch_micros"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NO_DIMENSIONS: dict[str, str] = {}


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the epoch, exact (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


class Series:
    """The events of one (event name, customer), as parallel columns sorted lazily by time."""

    __slots__ = (
        "customer_id",
        "dimensions",
        "event_name",
        "ids",
        "is_sorted",
        "order",
        "times",
        "values",
    )

    def __init__(self, customer_id: str, event_name: str) -> None:
        self.customer_id = customer_id
        self.event_name = event_name
        self.times = array("q")
        self.order = array("q")  # provider-wide ingestion order: breaks ties for `latest`
        self.values: list[Decimal | None] = []  # None marks a cancelled event
        self.dimensions: list[dict[str, str]] = []
        self.ids: list[str] = []
        self.is_sorted = True

    def append(self, event: UsageEvent, micros: int, value: Decimal, order: int) -> None:
        if self.times and micros < self.times[-1]:
            self.is_sorted = False
        self.times.append(micros)
        self.order.append(order)
        self.values.append(value)
        self.dimensions.append(event.dimensions or _NO_DIMENSIONS)
        self.ids.append(event.id)

    def ensure_sorted(self) -> None:
        """Sort the columns by time; stable, so ties keep ingestion order."""
        if self.is_sorted:
            return
        by_time = sorted(range(len(self.times)), key=self.times.__getitem__)
        self.times = array("q", (self.times[i] for i in by_time))
        self.order = array("q", (self.order[i] for i in by_time))
        self.values = [self.values[i] for i in by_time]
        self.dimensions = [self.dimensions[i] for i in by_time]
        self.ids = [self.ids[i] for i in by_time]
        self.is_sorted = True

    def span(self, start: int, end: int) -> range:
        """Positions of the events with start <= time < end."""
        self.ensure_sorted()
        return range(bisect.bisect_left(self.times, start), bisect.bisect_left(self.times, end))

    def positions(self, event_ids: set[str]) -> dict[str, int]:
        """Where the given ids sit, found in one pass: cancellation is rare, so no id index
        is kept, but one request scans each series once, not once per id."""
        return {event_id: i for i, event_id in enumerate(self.ids) if event_id in event_ids}

    def cancel(self, position: int) -> bool:
        """Take an event out of usage; False if it was already cancelled."""
        if self.values[position] is None:
            return False
        self.values[position] = None
        return True
