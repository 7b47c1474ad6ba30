"""Group commit: concurrent ingests into one store share a transaction.

A request that finds a lane free is written at once, alone. Requests that arrive while
every lane is writing wait, and the next free lane takes them all (up to `max_events`)
into one transaction, as PostgreSQL's `commit_delay` and log-structured stores do: under
load a transaction's round trips and its commit are paid once for many callers, and at
rest nobody waits for a timer. Each caller is answered for exactly its own events, after
the transaction that holds them has committed.

A failed transaction has committed nothing: an outage fails every caller in it (each
retries on its own, and what it retries is then a new event or a duplicate, never counted
twice). Any other failure is written again one caller at a time, so a failure that one
caller's events cause cannot fail the others'.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from metering_core.errors import ProviderUnavailableError
from metering_core.models import IngestResult, UsageEvent

__all__ = ["GroupCommit", "Ingest"]


@dataclass(eq=False)
class Ingest:
    """One caller's events, and where its answer goes."""

    events: Sequence[UsageEvent]
    lowering_refused: bool
    answer: asyncio.Future[IngestResult]


Write = Callable[[Sequence[Ingest]], Awaitable[list[IngestResult]]]
"""Writes a group in one transaction; an answer per ingest, in order."""


class GroupCommit:
    """Coalesces concurrent ingests into shared transactions, at most `lanes` at once."""

    def __init__(self, write: Write, *, lanes: int, max_events: int) -> None:
        self._write = write
        self._lanes = lanes
        self._max_events = max_events
        self._waiting: collections.deque[Ingest] = collections.deque()
        self._writing: set[asyncio.Task[None]] = set()

    async def ingest(self, events: Sequence[UsageEvent], *, lowering_refused: bool) -> IngestResult:
        """Store `events` in the next transaction; their answer once it has committed."""
        loop = asyncio.get_running_loop()
        request = Ingest(events, lowering_refused, loop.create_future())
        self._waiting.append(request)
        if self._busy_lanes(loop) < self._lanes:
            lane = loop.create_task(self._drain(), name="metering-group-commit")
            self._writing.add(lane)
            lane.add_done_callback(self._writing.discard)
        # A caller cancelled before its group is taken is left out of it (never written,
        # never acknowledged); after, its events commit with the group and a retry finds
        # them duplicates.
        return await request.answer

    def _busy_lanes(self, loop: asyncio.AbstractEventLoop) -> int:
        """Lanes writing in this loop. A lane that has just finished is done before its
        done-callback runs (a caller it answered may run first); one of a loop that has
        closed writes no more."""
        for lane in [lane for lane in self._writing if lane.done() or lane.get_loop() is not loop]:
            self._writing.discard(lane)
        return len(self._writing)

    async def _drain(self) -> None:
        """Write groups until nobody waits."""
        group: list[Ingest] = []
        try:
            while self._waiting:
                group = self._take()
                if group:
                    await self._commit(group)
                group = []
        except BaseException as exc:  # cancelled (the loop is closing): nobody is left waiting
            failure = ProviderUnavailableError(
                f"the store's writer stopped before committing: {type(exc).__name__}",
                provider="sql",
            )
            for request in (*group, *self._waiting):
                _fail(request, failure)
            self._waiting.clear()
            raise

    def _take(self) -> list[Ingest]:
        """The waiting requests, oldest first, up to `max_events` (a larger one alone)."""
        group: list[Ingest] = []
        count = 0
        while self._waiting:
            request = self._waiting[0]
            if request.answer.done():  # its caller was cancelled while it waited
                self._waiting.popleft()
                continue
            if group and count + len(request.events) > self._max_events:
                break
            group.append(self._waiting.popleft())
            count += len(request.events)
        return group

    async def _commit(self, group: list[Ingest]) -> None:
        try:
            answers = await self._write(group)
        except Exception as exc:
            if len(group) == 1 or isinstance(exc, ProviderUnavailableError):
                for request in group:
                    _fail(request, exc)
                return
            for request in group:
                try:
                    [answer] = await self._write([request])
                except Exception as alone:
                    _fail(request, alone)
                else:
                    _answer(request, answer)
            return
        for request, answer in zip(group, answers, strict=True):
            _answer(request, answer)


def _answer(request: Ingest, answer: IngestResult) -> None:
    if not request.answer.done():
        request.answer.set_result(answer)


def _fail(request: Ingest, exc: BaseException) -> None:
    if not request.answer.done():
        request.answer.set_exception(exc)
