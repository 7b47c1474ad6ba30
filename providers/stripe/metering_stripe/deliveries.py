"""What the provider remembers of events it delivered: Stripe needs the event name to
cancel, keeps identifiers unique for 24 hours, and validates the stream asynchronously."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

WINDOW = 24 * 3600


class RecentDeliveries:
    """Event id → (event name, when delivered), for the last 24 hours."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def add(self, event_id: str, event_name: str) -> None:
        self._entries[event_id] = (event_name, time.time())
        self._entries.move_to_end(event_id)
        self._expire()

    def get(self, event_id: str) -> tuple[str, float] | None:
        self._expire()
        return self._entries.get(event_id)

    def forget(self, event_ids: Iterable[str]) -> None:
        """Stripe refused these after all (a meter error report): sent again, they are
        new to it, not duplicates."""
        for event_id in event_ids:
            self._entries.pop(event_id, None)

    def __contains__(self, event_id: object) -> bool:
        return isinstance(event_id, str) and self.get(event_id) is not None

    def _expire(self) -> None:
        cutoff = time.time() - WINDOW
        while self._entries:
            first = next(iter(self._entries.values()))
            if first[1] >= cutoff:
                return
            self._entries.popitem(last=False)
