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

    __slots__ = ("customer_id", "dimensions", "event_name", "ids", "is_sorted", "times", "values")

    def __init__(self, customer_id: str, event_name: str) -> None:
        self.customer_id = customer_id
        self.event_name = event_name
        self.times = array("q")
        self.values: list[Decimal | None] = []  # None marks a cancelled event
        self.dimensions: list[dict[str, str]] = []
        self.ids: list[str] = []
        self.is_sorted = True

    def append(self, event: UsageEvent, micros: int, value: Decimal) -> None:
        if self.times and micros < self.times[-1]:
            self.is_sorted = False
        self.times.append(micros)
        self.values.append(value)
        self.dimensions.append(event.dimensions or _NO_DIMENSIONS)
        self.ids.append(event.id)

    def ensure_sorted(self) -> None:
        """Sort the columns by time; stable, so ties keep ingestion order."""
        if self.is_sorted:
            return
        order = sorted(range(len(self.times)), key=self.times.__getitem__)
        self.times = array("q", (self.times[i] for i in order))
        self.values = [self.values[i] for i in order]
        self.dimensions = [self.dimensions[i] for i in order]
        self.ids = [self.ids[i] for i in order]
        self.is_sorted = True

    def span(self, start: int, end: int) -> range:
        """Positions of the events with start <= time < end."""
        self.ensure_sorted()
        return range(bisect.bisect_left(self.times, start), bisect.bisect_left(self.times, end))

    def cancel(self, event_id: str) -> bool:
        """Take an event out of usage; False if it was already cancelled. Cancellation is
        rare, so finding the id by scanning one series is fine."""
        position = self.ids.index(event_id)
        if self.values[position] is None:
            return False
        self.values[position] = None
        return True
