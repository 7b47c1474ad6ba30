"""How one batch reaches a provider: the delivery policy, apart from any queue.

Attempts with exponential backoff and jitter, never sooner than a provider's Retry-After;
a provider call bounded by `delivery_timeout`; ids an answer leaves out sent again; a batch
refused as data, or too slow twice, halved until each part lands or stands alone; and an
answer for every id of the batch, exactly once.

Only data is ever refused for good: a provider's `ValidationError` for the batch, or its
per-event rejections. Any other failure (an outage, a rate limit, refused credentials, a
misconfigured or broken provider or service, a read-only or missing store) is the
provider's, not the events': it is retried with capped backoff and logged each time. With a
durable outbox behind it (`durable`) that never ends: the events wait, and are delivered
once the provider is fixed, instead of becoming dead letters that nobody bills.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Sequence

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from metering_core.config import MeteringSettings
from metering_core.errors import ProviderUnavailableError, RateLimitedError, ValidationError
from metering_core.interface import IMetering
from metering_core.models import IngestResult, UsageEvent

__all__ = ["GAVE_UP", "MAX_BACKOFF", "MAX_RETRY_AFTER", "DeliveryPolicy", "account"]

logger = logging.getLogger("metering")

MAX_BACKOFF = 10.0
"""The longest wait between attempts (seconds), unless the provider asks for longer."""
GAVE_UP = "gave up after"
"""How the reason of an event given up on (the provider failing, not refusing it) begins."""
MAX_RETRY_AFTER = 300.0
"""The longest a provider's Retry-After is honoured (an absurd one must not stall us)."""


def _retryable(exc: BaseException) -> bool:
    """Any failure but a refusal of the data is worth trying again; a cancellation (or
    any other BaseException) is not a failure: tenacity sees it too, and retrying it had
    swallowed the cancellation of a delivery (a deadline, a close) into more attempts."""
    return isinstance(exc, Exception) and not isinstance(exc, ValidationError)


class _Unreported(Exception):
    """The provider answered without accounting for some ids of the batch."""

    def __init__(self, provider: str, count: int) -> None:
        super().__init__(f"provider {provider!r} left {count} id(s) of the batch out of its answer")


def account(
    batch: Sequence[UsageEvent], answer: IngestResult
) -> tuple[IngestResult, list[UsageEvent]]:
    """What the answer says of each event of the batch, once per event (an id sent twice
    in one batch is one accepted and one duplicate), ignoring ids not in the batch; and
    the events it left out."""
    ids = [event.id for event in batch]
    if answer.accepted == ids:  # the common answer, every copy accepted in turn: as below
        return IngestResult(accepted=ids), []
    accepted = collections.Counter(answer.accepted)  # counts, not a list per event:
    duplicates = collections.Counter(answer.duplicates)  # batches are 10,000 events
    accounted = IngestResult()
    missing: list[UsageEvent] = []
    for event in batch:
        if accepted[event.id] > 0:  # an id said accepted goes to its first copy
            accepted[event.id] -= 1
            accounted.accepted.append(event.id)
        elif duplicates[event.id] > 0:
            duplicates[event.id] -= 1
            accounted.duplicates.append(event.id)
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


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class DeliveryPolicy:
    """Delivers a batch to `provider` under `settings` (attempts, backoff, timeout) and
    answers for every id. `on_retry(count)` is told of each retry of `count` events."""

    def __init__(
        self,
        provider: IMetering,
        settings: MeteringSettings,
        *,
        durable: bool,
        on_retry: Callable[[int], None] | None = None,
    ) -> None:
        self._provider = provider
        self._settings = settings
        self._durable = durable
        self._on_retry = on_retry

    async def settle(self, batch: Sequence[UsageEvent]) -> IngestResult:
        """Deliver with retries until the provider has answered for every id; split a batch
        that is refused for good; report every id exactly once.

        Ids an answer leaves out are sent again (alone) on the next attempt. When durable,
        retryable failures never end: the events are kept and wait out any outage.
        """
        settled = IngestResult()
        pending = list(batch)
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
                    answered, pending = account(pending, answer)
                    settled = settled.merge(answered)
                    if pending:
                        raise _Unreported(self._provider.name, len(pending))
        except Exception as exc:
            if len(pending) > 1 and (
                self._durable or isinstance(exc, ValidationError | TimeoutError)
            ):
                # A refused event sinks a batch: halve until it stands alone. A batch the
                # provider does not finish within delivery_timeout on a second attempt is
                # halved too, or it would be sent whole forever (when durable), never landing.
                # When durable, any batch still failing after max_attempts is halved: a
                # failure of one event's own (a provider's bug on it) then holds only that
                # event, and the rest land; a failure of the provider's fails every half
                # alike, and they wait it out one at a time.
                middle = len(pending) // 2
                first = await self.settle(pending[:middle])
                return settled.merge(first).merge(await self.settle(pending[middle:]))
            reason = f"{type(exc).__name__}: {exc}"
            if _retryable(exc):
                reason = f"{GAVE_UP} {self._settings.max_attempts} attempts: {reason}"
            return settled.merge(IngestResult(rejected={event.id: reason for event in pending}))
        return settled

    async def _call_provider(self, events: list[UsageEvent]) -> IngestResult:
        """One delivery attempt. A provider call that ends cancelled while this task is not
        being cancelled (a provider's own task torn down) is a failed attempt to retry:
        let through, it ended the delivery with its events neither delivered nor reported.
        While this task is being cancelled, the call ends cancelled, and when its time is
        up, timed out, whatever error the provider made of either."""
        deadline = asyncio.timeout(self._settings.delivery_timeout)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for answers with the call's
            # result when a cancellation reaches it as the call completes (CPython
            # gh-86296), and the cancelled delivery carried on
            async with deadline:
                return await self._provider.ingest_usage_events(events)
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise ProviderUnavailableError(
                "the provider's call was cancelled before it answered",
                provider=self._provider.name,
            ) from None
        except Exception as exc:
            if _being_cancelled():
                raise asyncio.CancelledError from exc
            if deadline.expired() and not isinstance(exc, TimeoutError):
                raise TimeoutError from exc
            raise

    def _stop(self, state: RetryCallState, count: int) -> bool:
        """Stop after `max_attempts`; when durable, only to halve a batch of several events
        (`count`), or for a provider that keeps leaving ids out of its answers: a single
        event waits out any outage. A batch timing out on a second or later attempt stops
        here too, to be halved."""
        timed_out = state.outcome is not None and isinstance(
            state.outcome.exception(), TimeoutError
        )
        if count > 1 and timed_out and state.attempt_number >= 2:
            return True
        if state.attempt_number < self._settings.max_attempts:
            return False
        if not self._durable or state.outcome is None or count > 1:
            return True
        return isinstance(state.outcome.exception(), _Unreported)

    def _retrying(self, state: RetryCallState, count: int) -> None:
        """One log line and a count per retry: what failed, and when it is tried again."""
        if self._on_retry is not None:
            self._on_retry(count)
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
