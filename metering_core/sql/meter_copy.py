"""This process's copy of the meters ingest judges events by, by event name.

Never trusted on its own: the statement that writes events judged by it checks, in the
store, that each meter is still as copied and that the names it had no meter for still
have none (`insert_events_checked`); when not, nothing is written and the events are
judged again by the meters read in the write's own transaction, which refresh the copy.
So another process's meter change is seen at once, and the copy only saves round trips.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from metering_core.sql.ingest import EventMeter

__all__ = ["MeterCopy"]

MAX_COPIED = 10_000
"""Meters kept at most; past it the copy starts again (a hostile stream of names is not
copied at all: only meters that exist are)."""


class MeterCopy:
    """Meters by event name, as last read from the store."""

    def __init__(self) -> None:
        self._meters: dict[str, EventMeter] = {}

    def of(self, names: Collection[str]) -> dict[str, EventMeter]:
        """The copied meters of these names (a name missing here is presumed meterless)."""
        return {name: self._meters[name] for name in names if name in self._meters}

    def keep(self, names: Collection[str], read: Mapping[str, EventMeter]) -> None:
        """What the store said of `names`: their meters, `read`, and none for the rest."""
        for name in names:
            self._meters.pop(name, None)
        if len(self._meters) + len(read) > MAX_COPIED:
            self._meters.clear()
        self._meters.update(read)

    def forget(self) -> None:
        """After this process changed a meter (saves the check a retry)."""
        self._meters.clear()
