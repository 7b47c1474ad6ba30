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
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class _Queue:
    """One event loop's waiting requests and the lanes writing them: a request is
    answered in the loop that asked (its future belongs there), and a loop that has
    closed takes its queue with it."""

    waiting: collections.deque[Ingest] = field(default_factory=collections.deque)
    lanes: set[asyncio.Task[None]] = field(default_factory=set)


class GroupCommit:
    """Coalesces concurrent ingests into shared transactions, at most `lanes` at once."""

    def __init__(self, write: Write, *, lanes: int, max_events: int) -> None:
        self._write = write
        self._lanes = lanes
        self._max_events = max_events
        self._queues: dict[asyncio.AbstractEventLoop, _Queue] = {}

    async def ingest(self, events: Sequence[UsageEvent], *, lowering_refused: bool) -> IngestResult:
        """Store `events` in the next transaction; their answer once it has committed."""
        loop = asyncio.get_running_loop()
        queue = self._queue(loop)
        request = Ingest(events, lowering_refused, loop.create_future())
        queue.waiting.append(request)
        # A lane that has just finished is done before its done-callback would run (a
        # caller it answered may run first): done lanes are not counted.
        queue.lanes = {lane for lane in queue.lanes if not lane.done()}
        if len(queue.lanes) < self._lanes:
            queue.lanes.add(loop.create_task(self._drain(queue), name="metering-group-commit"))
        # A caller cancelled before its group is taken is left out of it (never written,
        # never acknowledged); after, its events commit with the group and a retry finds
        # them duplicates.
        return await request.answer

    def _queue(self, loop: asyncio.AbstractEventLoop) -> _Queue:
        for closed in [other for other in self._queues if other.is_closed()]:
            del self._queues[closed]
        return self._queues.setdefault(loop, _Queue())

    async def _drain(self, queue: _Queue) -> None:
        """Write groups until nobody waits."""
        group: list[Ingest] = []
        try:
            while queue.waiting:
                group = self._take(queue)
                if group:
                    await self._commit(group)
                group = []
        except BaseException as exc:  # cancelled (the loop is closing): nobody is left waiting
            failure = ProviderUnavailableError(
                f"the store's writer stopped before committing: {type(exc).__name__}",
                provider="sql",
            )
            stranded = [*group, *queue.waiting]
            queue.waiting.clear()
            for request in stranded:
                _fail(request, failure)
            raise

    def _take(self, queue: _Queue) -> list[Ingest]:
        """The waiting requests, oldest first, up to `max_events` (a larger one alone)."""
        group: list[Ingest] = []
        count = 0
        while queue.waiting:
            request = queue.waiting[0]
            if request.answer.done():  # its caller was cancelled while it waited
                queue.waiting.popleft()
                continue
            if group and count + len(request.events) > self._max_events:
                break
            group.append(queue.waiting.popleft())
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
    if _waited_for(request):
        request.answer.set_result(answer)


def _fail(request: Ingest, exc: BaseException) -> None:
    if _waited_for(request):
        request.answer.set_exception(exc)


def _waited_for(request: Ingest) -> bool:
    """Whether a caller still waits: not cancelled, and its loop not closed (nothing
    could run it, and answering would raise)."""
    return not request.answer.done() and not request.answer.get_loop().is_closed()
