"""Ingestion: events queue here, form batches, and reach the provider.

Batches form by size (the provider's `max_batch_size`) and by linger time. Up to
`max_concurrency` batches are in flight, each delivered by the `DeliveryPolicy` (retries,
backoff, Retry-After, halving: `delivery.py`). Nothing is dropped: a full queue blocks the
caller (or raises `QueueFullError` after its timeout), and every event ends up accepted, a
duplicate, or rejected with its reason in the report `flush()` returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from metering_core.capability_cache import CapabilityCache
from metering_core.config import MeteringSettings
from metering_core.delivery import DeliveryPolicy
from metering_core.errors import QueueFullError
from metering_core.interface import IMetering
from metering_core.metrics import PipelineStats
from metering_core.models import IngestResult, UsageEvent
from metering_core.spool import Spool

__all__ = ["Pipeline"]

logger = logging.getLogger("metering")


class _Report:
    """What became of delivered events since the last flush; appended per batch."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.duplicates: list[str] = []
        self.rejected: dict[str, str] = {}

    def add(self, result: IngestResult) -> None:
        self.accepted.extend(result.accepted)
        self.duplicates.extend(result.duplicates)
        self.rejected.update(result.rejected)

    def take(self) -> IngestResult:
        result = IngestResult(
            accepted=self.accepted, duplicates=self.duplicates, rejected=self.rejected
        )
        self.accepted, self.duplicates, self.rejected = [], [], {}
        return result


_CANCEL_AGAIN = 0.5
"""Seconds a closing pipeline waits for its cancelled tasks before cancelling them again."""


def _log_failure(task: asyncio.Task[None]) -> None:
    """Log work run alongside delivery that ended in an error: nobody awaits it before
    close, and it should never end by itself."""
    if not task.cancelled() and (failure := task.exception()) is not None:
        logger.error("%s stopped: %s", task.get_name(), failure, exc_info=failure)


class Pipeline:
    """Queues validated events and delivers them in batches; safe to feed from any thread."""

    def __init__(
        self,
        provider: IMetering,
        settings: MeteringSettings,
        *,
        capabilities: CapabilityCache | None = None,
        on_delivered: Callable[[IngestResult], None] | None = None,
        alongside: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        """`alongside`: work that runs for as long as delivery does (the ledger's
        forwarder), started with the batching task and cancelled with it."""
        self._provider = provider
        self._alongside = alongside
        self._capabilities = capabilities or CapabilityCache(provider)
        self._settings = settings
        self._on_delivered = on_delivered
        self._spool = Spool(settings.spool_path) if settings.spool_path is not None else None
        self._delivery = DeliveryPolicy(
            provider, settings, durable=self._spool is not None, on_retry=self._count_retry
        )
        self._buffer: collections.deque[UsageEvent] = collections.deque()
        self._state = threading.Condition()  # guards the counters below; signals free space
        self._submitted = 0
        self._completed = 0
        # For flush, in the loop's thread: events taken from the queue into batches so far
        # (they leave it in the order they were queued), and the batches not yet settled,
        # by the place of their first event in that order.
        self._taken = 0
        self._unsettled: set[int] = set()
        self._report = _Report()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._wake_pending = False
        self._flushing = 0
        self._runner: asyncio.Task[None] | None = None
        self._companion: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._progress: asyncio.Condition | None = None
        self._failure: BaseException | None = None
        self._pid = os.getpid()
        self._closing = False  # from the start of aclose: no event is accepted
        self._closed = False  # after it: no batching task is started again
        self.stats = PipelineStats(provider.name)
        """Counts of what the pipeline did (also reported through OpenTelemetry)."""
        if self._spool is not None:
            self._enqueue(self._spool.pending())

    @property
    def spool(self) -> Spool | None:
        """The durable outbox, when `spool_path` is set (dead letters live there)."""
        return self._spool

    # starting, in the loop that first uses the pipeline

    async def start(self) -> None:
        """Bind to the running loop and start the batching task (idempotent; never again
        once closed: nothing may be delivered after `aclose`). Another loop is refused: the
        batching task runs in the first, and events queued from another would wait for a
        task that no longer runs once that loop has closed (a second `asyncio.run`)."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "this metering client is bound to the event loop it was first used in; "
                "create one per event loop (or use the sync Metering from any thread)"
            )
        if self._runner is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._settings.max_concurrency)
        self._progress = asyncio.Condition()
        self._runner = asyncio.create_task(self._run(), name="metering-pipeline")
        if self._alongside is not None:
            self._companion = asyncio.create_task(self._alongside(), name="metering-alongside")
            self._companion.add_done_callback(_log_failure)
        self._wake.set()

    # submitting

    async def submit(self, events: Sequence[UsageEvent], *, timeout: float | None = None) -> None:
        """Queue events from the loop; waits (without blocking the loop) while the queue is full."""
        await self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done_waiting(len(events)):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise self._queue_full(len(events), timeout)
            assert self._progress is not None
            async with self._progress:
                try:
                    await asyncio.wait_for(self._progress.wait(), remaining)
                except TimeoutError:
                    continue
        self._accept(events)

    def submit_threadsafe(
        self, events: Sequence[UsageEvent], *, timeout: float | None = None
    ) -> None:
        """Queue events from another thread; blocks that thread while the queue is full."""
        with self._state:
            if not self._state.wait_for(lambda: self._done_waiting(len(events)), timeout):
                raise self._queue_full(len(events), timeout)
        self._accept(events)

    def _done_waiting(self, count: int) -> bool:
        """Room for `count` more events, or a reason to refuse them (`_accept` raises it)."""
        return self._has_room(count) or self._refusal() is not None

    def _has_room(self, count: int) -> bool:
        pending = self._submitted - self._completed
        return pending == 0 or pending + count <= self._settings.max_queue

    def _queue_full(self, count: int, timeout: float | None) -> QueueFullError:
        return QueueFullError(
            f"the ingestion queue stayed full for {timeout}s "
            f"(max_queue={self._settings.max_queue}); {count} event(s) not queued"
        )

    def _accept(self, events: Sequence[UsageEvent]) -> None:
        """Make events durable (with a spool), then queue them: only then is ingest
        acknowledged. Refused once closing (nothing would deliver them, and a close's flush
        counts every event accepted before it began) and in a forked child."""
        with self._state:
            refusal = self._refusal()
            if refusal is not None:
                raise RuntimeError(f"{len(events)} event(s) not queued: {refusal}")
            if self._spool is None:
                self._enqueue(events)  # under the lock: a close's flush target counts them
                return
        # Committed outside the lock, which the event loop's thread takes too, so it never
        # waits on a disk. A close racing this leaves them in the spool for the next process.
        self._spool.add(events)
        self._enqueue(events)

    def _refusal(self) -> str | None:
        """Why this client takes no more events, if it does not; a caller waiting for
        room in the queue stops waiting for this too."""
        if self._closing:
            return "this metering client is closed"
        # its batching task runs in the parent process only. Asked of the system each time:
        # a fork made from C (uWSGI's workers, by default) runs no Python at-fork hook
        if os.getpid() != self._pid:
            return (
                "this metering client was created before a fork; create one in each process "
                "(its queue, delivery and spool belong to the process that made it)"
            )
        return None

    def _enqueue(self, events: Sequence[UsageEvent]) -> None:
        with self._state:
            self._submitted += len(events)
            self.stats.on_queued(len(events))
            self._buffer.extend(events)
        self._nudge()

    def _nudge(self) -> None:
        """Wake the batching task once, from whichever thread we are on."""
        if self._wake_pending or self._loop is None or self._wake is None:
            return
        self._wake_pending = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    # batching and delivery

    async def _run(self) -> None:
        assert self._wake is not None
        assert self._slots is not None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._wake_pending = False
                while self._buffer:
                    size = await self._capabilities.batch_size(self._settings.delivery_timeout)
                    if (
                        len(self._buffer) < size
                        and not self._flushing
                        and self._settings.linger > 0
                    ):
                        await asyncio.sleep(self._settings.linger)
                    batch = [self._buffer.popleft() for _ in range(min(size, len(self._buffer)))]
                    first, self._taken = self._taken, self._taken + len(batch)
                    self._unsettled.add(first)
                    await self._slots.acquire()
                    task = asyncio.create_task(self._deliver(batch, first))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by flush(); never swallowed
            self._failure = exc
            assert self._progress is not None
            async with self._progress:
                self._progress.notify_all()  # a waiting flush() raises instead of waiting on
            raise

    async def _deliver(self, batch: list[UsageEvent], first: int) -> None:
        assert self._slots is not None
        began = time.monotonic()
        try:
            result = await self._delivery.settle(batch)
            self._record(batch, result, time.monotonic() - began)
        except asyncio.CancelledError:
            raise  # closing: the batch stays in the spool (or was never acknowledged durably)
        except BaseException as exc:
            self._failure = self._failure or exc
            raise
        finally:
            self._slots.release()
            self._unsettled.discard(first)
            await self._completed_batch(len(batch))

    def _count_retry(self, count: int) -> None:
        self.stats.on_retry(count)

    def _record(self, batch: list[UsageEvent], result: IngestResult, seconds: float) -> None:
        if self._spool is not None:
            self._spool.settle(batch, result)
        dead = len(result.rejected) if self._spool is not None else 0
        self._count(len(batch), result, seconds, dead)
        self._report.add(result)

    def record_direct(self, count: int, result: IngestResult, seconds: float) -> None:
        """Count a delivery made around the queue (`deliver_usage_events`: the REST
        service's and the Lambda API's ingestion) as the queue's own are counted: the
        same statistics, log line and `usage_delivered` hook, so one set of counters
        describes every way usage came in. (Its caller has the answer; no report.)"""
        self.stats.on_queued(count)
        self._count(count, result, seconds, dead=0)

    def _count(self, count: int, result: IngestResult, seconds: float, dead: int) -> None:
        self.stats.on_settled(count, result, seconds, dead)
        if result.rejected:
            first_id, reason = next(iter(result.rejected.items()))
            logger.warning(
                "provider %r refused %d event(s)%s; first: %r: %s",  # the id a sender's
                self._provider.name,
                len(result.rejected),
                " (kept as dead letters)" if dead else "",
                first_id,
                reason,
            )
        if self._on_delivered is not None:
            try:
                self._on_delivered(result)
            except Exception:
                logger.exception("a usage_delivered hook failed; the delivery report is kept")

    async def _completed_batch(self, count: int) -> None:
        with self._state:
            self._completed += count
            self._state.notify_all()
        assert self._progress is not None
        async with self._progress:
            self._progress.notify_all()

    def retry_dead_letters(self, ids: Sequence[str] | None = None) -> list[str]:
        """Queue dead letters (all, or these ids) for another delivery; returns their ids."""
        if self._spool is None:
            return []
        events = self._spool.requeue_dead_letters(ids)
        self._enqueue(events)
        return [event.id for event in events]

    # flushing

    async def flush(self, timeout: float | None = None) -> IngestResult:
        """Wait until every event queued before this call is delivered; report since last
        flush. Once closed, at once: what the close left in the spool is the next process's."""
        await self.settle(timeout)
        return self._report.take()

    async def settle(self, timeout: float | None = None) -> None:
        """Wait as `flush` does, leaving the report to the next flush (for a read or a
        cancel that must see what was queued before it)."""
        if self._closed:
            return
        await self.start()
        target = self._submitted
        self._flushing += 1
        try:
            self._nudge()
            await asyncio.wait_for(self._until_completed(target), timeout)
        finally:
            self._flushing -= 1
        if self._failure is not None:
            # Sticky: a pipeline whose batching task died cannot deliver; every flush says so.
            raise self._failure

    async def _until_completed(self, target: int) -> None:
        assert self._progress is not None
        async with self._progress:
            await self._progress.wait_for(
                lambda: self._settled(target) or self._failure is not None
            )

    def _settled(self, target: int) -> bool:
        """Whether the first `target` events queued are settled: all taken into batches, and
        no batch holding one of them still out. Not a count of settled events: batches
        settle in any order, and later events settling first must not stand in for these."""
        return self._taken >= target and all(first >= target for first in self._unsettled)

    async def aclose(self) -> IngestResult:
        """Deliver what is queued, stop the batching task, and report.

        With a spool, an outage cannot hold the caller: after `delivery_timeout` the
        undelivered events stay committed in the spool for the next process to deliver.
        """
        self._alongside = None  # a pipeline first started by its close needs none
        if os.getpid() != self._pid:
            # A forked child's copy: its tasks are the parent's loop's and never end here,
            # and what it holds is the parent's to deliver (delivered here, it would count
            # twice). Closed, with nothing done.
            self._closing = self._closed = True
            return IngestResult()
        with self._state:
            self._closing = True
            self._state.notify_all()  # callers waiting for room now raise instead
        if self._progress is not None:
            async with self._progress:
                self._progress.notify_all()
        try:
            if self._spool is None:
                report = await self.flush()
            else:
                try:
                    report = await self.flush(self._settings.delivery_timeout)
                except TimeoutError:
                    report = self._report.take()
                    self.stats.on_abandoned(self._submitted - self._completed)
                    logger.warning(
                        "closing with %d event(s) undelivered; they stay in the spool %s "
                        "and are delivered when it is opened again",
                        self._submitted - self._completed,
                        self._spool.path,
                    )
        finally:
            await self._stop_tasks()
            self._closed = True
            if self._spool is not None:
                self._spool.close()
        return report

    async def _stop_tasks(self) -> None:
        """Cancel the batching task and the deliveries in flight, and wait for them. A
        cancellation can be lost: Python 3.11's `asyncio.wait_for` swallows one that
        arrives as the call it waits on completes, and the delivery then retries on (for
        ever, with a spool). So each task still running is cancelled again until it ends:
        a close once hung there, about one run in a hundred of the outage test."""
        started = (self._runner, self._companion)
        tasks = {*self._in_flight, *(task for task in started if task is not None)}
        while tasks:
            for task in tasks:
                task.cancel()
            done, tasks = await asyncio.wait(tasks, timeout=_CANCEL_AGAIN)
            for task in done:  # retrieved: a failure was recorded when it happened
                if not task.cancelled():
                    task.exception()
        self._runner = self._companion = None
