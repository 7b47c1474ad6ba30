"""Ingestion: events queue here, form batches, and reach the provider with retries.

Batches form by size (the provider's `max_batch_size`) and by linger time. Up to
`max_concurrency` batches are in flight. Retryable failures are retried with exponential
backoff and jitter, never sooner than a provider's `retry_after`; a batch that fails for
good is split so one bad event cannot sink the others. Nothing is dropped: a full queue
blocks the caller (or raises `QueueFullError` after its timeout), and every event ends up
accepted, a duplicate, or rejected with its reason in the report `flush()` returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from metering_core.capability_cache import CapabilityCache
from metering_core.config import MeteringSettings
from metering_core.errors import (
    ProviderError,
    ProviderUnavailableError,
    QueueFullError,
    RateLimitedError,
    ValidationError,
)
from metering_core.interface import IMetering
from metering_core.metrics import PipelineStats
from metering_core.models import IngestResult, UsageEvent
from metering_core.spool import Spool

__all__ = ["Pipeline"]

logger = logging.getLogger("metering")

MAX_BACKOFF = 10.0
MAX_RETRY_AFTER = 300.0
"""The longest a provider's Retry-After is honoured (an absurd one must not stall us)."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError | _Unreported) or (
        isinstance(exc, ProviderError) and exc.retryable
    )


class _Unreported(Exception):
    """The provider answered without accounting for some ids of the batch."""

    def __init__(self, provider: str, count: int) -> None:
        super().__init__(f"provider {provider!r} left {count} id(s) of the batch out of its answer")


def _account(
    batch: Sequence[UsageEvent], answer: IngestResult
) -> tuple[IngestResult, list[UsageEvent]]:
    """What the answer says of each event of the batch, once per event (an id sent twice
    in one batch is one accepted and one duplicate), ignoring ids not in the batch; and
    the events it left out."""
    verdicts: dict[str, list[bool]] = {event.id: [] for event in batch}  # True: accepted
    for event_id in answer.accepted:
        if event_id in verdicts:
            verdicts[event_id].append(True)
    for event_id in answer.duplicates:
        if event_id in verdicts:
            verdicts[event_id].append(False)
    accounted = IngestResult()
    missing: list[UsageEvent] = []
    for event in batch:
        said = verdicts[event.id]
        if said:
            (accounted.accepted if said.pop(0) else accounted.duplicates).append(event.id)
        elif event.id in answer.rejected:
            accounted.rejected[event.id] = answer.rejected[event.id] or "rejected, no reason given"
        else:
            missing.append(event)
    return accounted, missing


class _Backoff:
    """Exponential backoff with jitter, and never sooner than the provider asked."""

    def __init__(self, first: float) -> None:
        self._exponential = wait_exponential_jitter(multiplier=first, max=MAX_BACKOFF, jitter=first)

    def __call__(self, state: RetryCallState) -> float:
        delay: float = self._exponential(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            asked = exc.retry_after if math.isfinite(exc.retry_after) else MAX_RETRY_AFTER
            delay = max(delay, min(asked, MAX_RETRY_AFTER))
        return delay


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


class Pipeline:
    """Queues validated events and delivers them in batches; safe to feed from any thread."""

    def __init__(
        self,
        provider: IMetering,
        settings: MeteringSettings,
        *,
        capabilities: CapabilityCache | None = None,
        on_delivered: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self._provider = provider
        self._capabilities = capabilities or CapabilityCache(provider)
        self._settings = settings
        self._on_delivered = on_delivered
        self._spool = Spool(settings.spool_path) if settings.spool_path is not None else None
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
            result = await self._settle(batch)
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

    async def _settle(self, batch: list[UsageEvent]) -> IngestResult:
        """Deliver with retries until the provider has answered for every id; split a batch
        that is refused for good; report every id exactly once.

        Ids an answer leaves out are sent again (alone) on the next attempt. With a spool,
        retryable failures never end: the events are durable and wait out any outage.
        """
        settled = IngestResult()
        pending = batch
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                # late binding on purpose: the events still pending when it asks or waits
                stop=lambda state: self._stop(state, len(pending)),  # noqa: B023
                wait=_Backoff(self._settings.retry_backoff),
                before_sleep=lambda state: self._retrying(state, len(pending)),  # noqa: B023
                reraise=True,
            ):
                with attempt:
                    answer = await self._call_provider(pending)
                    answered, pending = _account(pending, answer)
                    settled = settled.merge(answered)
                    if pending:
                        raise _Unreported(self._provider.name, len(pending))
        except Exception as exc:
            if len(pending) > 1 and isinstance(exc, ValidationError | TimeoutError):
                # A refused event sinks a batch: halve until it stands alone. A batch the
                # provider does not finish within delivery_timeout on a second attempt is
                # halved too, or it would be sent whole forever (with a spool), never landing.
                # Other failures (a bad key, an unsupported call) fail every half alike.
                middle = len(pending) // 2
                first = await self._settle(pending[:middle])
                return settled.merge(first).merge(await self._settle(pending[middle:]))
            reason = f"{type(exc).__name__}: {exc}"
            if _retryable(exc):
                reason = f"gave up after {self._settings.max_attempts} attempts: {reason}"
            return settled.merge(IngestResult(rejected={event.id: reason for event in pending}))
        return settled

    async def _call_provider(self, events: list[UsageEvent]) -> IngestResult:
        """One delivery attempt. A provider call that ends cancelled while this task is not
        being cancelled (a provider's own task torn down) is a failed attempt to retry:
        let through, it ended the delivery with its events neither delivered nor reported."""
        try:
            return await asyncio.wait_for(
                self._provider.ingest_usage_events(events), self._settings.delivery_timeout
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise ProviderUnavailableError(
                "the provider's call was cancelled before it answered",
                provider=self._provider.name,
            ) from None

    def _stop(self, state: RetryCallState, count: int) -> bool:
        """Stop after `max_attempts`; with a spool, only for a provider that keeps leaving
        ids out of its answers: outages and rate limits are waited out. A batch of `count`
        events timing out on a second or later attempt stops here too, to be halved."""
        timed_out = state.outcome is not None and isinstance(
            state.outcome.exception(), TimeoutError
        )
        if count > 1 and timed_out and state.attempt_number >= 2:
            return True
        if state.attempt_number < self._settings.max_attempts:
            return False
        if self._spool is None or state.outcome is None:
            return True
        return isinstance(state.outcome.exception(), _Unreported)

    def _retrying(self, state: RetryCallState, count: int) -> None:
        """One log line and a count per retry: what failed, and when it is tried again."""
        self.stats.on_retry(count)
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "delivery of %d event(s) to provider %r failed (attempt %d), retrying in %.2f s: %s",
            count,
            self._provider.name,
            state.attempt_number,
            delay,
            f"{type(exc).__name__}: {exc}" if exc else "no answer",
        )

    def _record(self, batch: list[UsageEvent], result: IngestResult, seconds: float) -> None:
        if self._spool is not None:
            self._spool.settle(batch, result)
        dead = len(result.rejected) if self._spool is not None else 0
        self.stats.on_settled(len(batch), result, seconds, dead)
        if result.rejected:
            first_id, reason = next(iter(result.rejected.items()))
            logger.warning(
                "provider %r refused %d event(s)%s; first: %s: %s",
                self._provider.name,
                len(result.rejected),
                " (kept as dead letters)" if dead else "",
                first_id,
                reason,
            )
        self._report.add(result)
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
        if self._closed:
            return self._report.take()
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
        return self._report.take()

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
        tasks = [*self._in_flight, *([self._runner] if self._runner is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = None
