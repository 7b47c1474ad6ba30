"""The delivery policy alone, with no queue: attempts, backoff, Retry-After, halving, and
an answer for every id exactly once."""

from __future__ import annotations

import asyncio

import pytest
from tenacity import RetryCallState

from metering_core import IngestResult, MeterCreate, MeteringSettings, RateLimitedError, UsageEvent
from metering_core.delivery import MAX_RETRY_AFTER, DeliveryPolicy, _Backoff

from .faulty import FaultyProvider

FAST = MeteringSettings(retry_backoff=0.001, max_attempts=3, delivery_timeout=0.2)


def batch(*ids: str) -> list[UsageEvent]:
    return [UsageEvent(id=i, event_name="api_calls", customer_id="acme") for i in ids]


def settle(
    provider: FaultyProvider, events: list[UsageEvent], *, durable: bool = False
) -> tuple[IngestResult, list[int]]:
    retries: list[int] = []

    async def run() -> IngestResult:
        await provider.create_meter(MeterCreate(event_name="api_calls"))
        policy = DeliveryPolicy(provider, FAST, durable=durable, on_retry=retries.append)
        return await policy.settle(events)

    return asyncio.run(run()), retries


def test_an_outage_shorter_than_the_attempts_is_retried_and_counted_once() -> None:
    provider = FaultyProvider(schedule=["unavailable", "unavailable"])
    result, retries = settle(provider, batch("a", "b"))
    assert (result.accepted, result.rejected) == (["a", "b"], {})
    assert retries == [2, 2]
    assert sorted(provider.stored_ids()) == ["a", "b"]


def test_not_durable_it_gives_up_after_max_attempts_with_the_reason() -> None:
    provider = FaultyProvider(schedule=["unavailable"] * 3)
    result, retries = settle(provider, batch("a"))
    assert "gave up after 3 attempts" in result.rejected["a"]
    assert len(provider.calls) == 3
    assert retries == [1, 1]


def test_durable_it_waits_out_an_outage_longer_than_max_attempts() -> None:
    provider = FaultyProvider(schedule=["unavailable"] * 5)
    result, _ = settle(provider, batch("a"), durable=True)
    assert (result.accepted, result.rejected) == (["a"], {})
    assert len(provider.calls) == 6


def test_a_batch_refused_for_good_is_halved_until_the_bad_event_stands_alone() -> None:
    provider = FaultyProvider(poisoned_ids={"c"})
    result, _ = settle(provider, batch("a", "b", "c", "d"))
    assert sorted(result.accepted) == ["a", "b", "d"]
    assert list(result.rejected) == ["c"]
    assert [size for _, size in provider.calls] == [4, 2, 2, 1, 1]


def test_a_batch_too_slow_twice_is_halved_and_lands() -> None:
    provider = FaultyProvider(schedule=["hang_after_storing", "hang_after_storing"])
    result, _ = settle(provider, batch("a", "b"), durable=True)
    assert sorted(result.duplicates) == ["a", "b"]  # stored by the hung calls
    assert [size for _, size in provider.calls] == [2, 2, 1, 1]


def test_ids_left_out_of_an_answer_are_sent_again_alone() -> None:
    class LeavesOneOut(FaultyProvider):
        left_out = True

        async def ingest_usage_events(self, events):  # type: ignore[no-untyped-def]
            result = await super().ingest_usage_events(events)
            if self.left_out:
                self.left_out = False
                result.accepted.remove("b")
            return result

    provider = LeavesOneOut()
    result, retries = settle(provider, batch("a", "b"))
    assert (result.accepted, result.duplicates) == (["a"], ["b"])
    assert retries == [1]
    assert [size for _, size in provider.calls] == [2, 1]


def test_each_copy_of_an_id_is_answered_once_and_strangers_are_ignored() -> None:
    """An id twice in a batch is one accepted and one duplicate, in the batch's order; an
    answer naming an id more often than it was sent, or one never sent, adds nothing."""

    class Chatty(FaultyProvider):
        async def ingest_usage_events(self, events):  # type: ignore[no-untyped-def]
            result = await super().ingest_usage_events(events)
            result.accepted.append("stranger")
            result.duplicates.extend(["a", "stranger"])
            return result

    provider = Chatty()
    result, retries = settle(provider, batch("a", "b", "a"))
    assert (result.accepted, result.duplicates, result.rejected) == (["a", "b"], ["a"], {})
    assert retries == []


@pytest.mark.parametrize(
    ("asked", "waited"), [(float("inf"), MAX_RETRY_AFTER), (1e9, MAX_RETRY_AFTER), (42.0, 42.0)]
)
def test_retry_after_is_honoured_up_to_a_cap(asked: float, waited: float) -> None:
    state = RetryCallState(None, None, (), {})
    state.set_exception(
        (RateLimitedError, RateLimitedError("slow", provider="x", retry_after=asked), None)
    )
    assert _Backoff(0.01)(state) == waited


def test_a_delivery_cancelled_by_its_caller_stops_instead_of_retrying() -> None:
    """A deadline or a close cancels a delivery: tenacity saw the CancelledError as one
    more failure and retried it, so the delivery outlived the deadline set on it."""
    provider = FaultyProvider(schedule=["hang_after_storing"] * 1000)  # cancelled mid-call
    slow = MeteringSettings(retry_backoff=0.001, max_attempts=1000, delivery_timeout=5.0)

    async def run() -> float:
        await provider.create_meter(MeterCreate(event_name="api_calls"))
        policy = DeliveryPolicy(provider, slow, durable=True)
        began = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(policy.settle(batch("a")), 0.3)
        return asyncio.get_running_loop().time() - began

    assert asyncio.run(run()) < 1.0
    assert len(provider.calls) == 1


def test_a_delivery_cancelled_while_its_provider_makes_an_error_of_it_stops() -> None:
    """The provider runs in the delivery's own task: its error, raised as the delivery is
    cancelled, is the cancellation, not a failure to retry."""
    provider = FaultyProvider(schedule=["hang_then_fail"] * 3)
    slow = MeteringSettings(retry_backoff=0.001, max_attempts=3, delivery_timeout=1.0)

    async def run() -> bool:
        await provider.create_meter(MeterCreate(event_name="api_calls"))
        delivering = asyncio.create_task(
            DeliveryPolicy(provider, slow, durable=False).settle(batch("a"))
        )
        await asyncio.sleep(0.2)
        delivering.cancel()
        await asyncio.wait({delivering}, timeout=5)  # retried, it would end after two more
        return delivering.cancelled()

    assert asyncio.run(run())
    assert len(provider.calls) == 1


def test_a_call_whose_provider_makes_an_error_of_its_timeout_is_timed_out() -> None:
    """Out of time, the call timed out whatever the provider raised: a batch that does
    so twice is halved, as any batch too slow twice is."""
    provider = FaultyProvider(schedule=["hang_then_fail", "hang_then_fail"])
    result, _ = settle(provider, batch("a", "b"), durable=True)
    assert sorted(result.accepted) == ["a", "b"]
    assert [size for _, size in provider.calls] == [2, 2, 1, 1]
