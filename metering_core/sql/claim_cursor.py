"""Where a forwarder's next claim of a mirror's usage rows starts, and claims in turn.

A claim takes the oldest rows nobody holds. Started from the outbox's head, it passes
over every row the forwarder's other passes hold (their leases); started at once, four
claims contend for the same rows and skip each other's. Four passes of 10,000 rows each
then cost PostgreSQL 166 to 394 ms a claim, against 25 to 45 ms for one claim alone. So the
passes of one forwarder claim in turn, each past the last row the claim before it took.

Rows behind that point can be free again: a pass gave them back (the mirror failed),
another forwarder's lease ran out (it died), or a row committed after a later one (its
seq was taken first by a slower transaction). So a claim starts from the head again when
the last one reached the end of what was owed, when a pass has given rows back, when
nothing is owed past the cursor, and at least every `sweep` seconds (a quarter of the
forwarder's lease).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import NamedTuple

__all__ = ["ClaimCursor", "Start"]


class Start(NamedTuple):
    """Where one claim starts: past `after` (0: from the head), and the cursor's state
    then (a claim moves the cursor only if nothing sent it back to the head meanwhile)."""

    after: int
    generation: int


class ClaimCursor:
    """Per mirror, the seq past which the next usage claim starts."""

    def __init__(self) -> None:
        self._after: dict[str, int] = {}
        self._generation: dict[str, int] = {}
        self._swept: dict[str, float] = {}
        self._turns: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Lock] = {}

    def turn(self, mirror: str) -> asyncio.Lock:
        """Held while claiming `mirror`'s rows, by one pass at a time (in each event loop:
        a lock belongs to one)."""
        for closed in [key for key in self._turns if key[0].is_closed()]:
            del self._turns[closed]
        return self._turns.setdefault((asyncio.get_running_loop(), mirror), asyncio.Lock())

    def start(self, mirror: str, *, sweep: float) -> Start:
        """Where the next claim starts: from the head when the last claim from there is
        `sweep` seconds old."""
        now = time.monotonic()
        if now - self._swept.get(mirror, -math.inf) >= sweep:
            self.restart(mirror)
        after = self._after.get(mirror, 0)
        if not after:
            self._swept[mirror] = now
        return Start(after, self._generation.get(mirror, 0))

    def claimed(self, mirror: str, start: Start, last: int, *, full: bool) -> None:
        """A claim from `start` took rows up to seq `last`; `full`: as many as it asked
        for (fewer: it reached the end, and the next starts from the head)."""
        if not full:
            self.restart(mirror)
        elif self._generation.get(mirror, 0) == start.generation:
            self._after[mirror] = max(self._after.get(mirror, 0), last)

    def restart(self, mirror: str) -> None:
        """The next claim starts from the head (rows behind the cursor are free again)."""
        self._after[mirror] = 0
        self._generation[mirror] = self._generation.get(mirror, 0) + 1
