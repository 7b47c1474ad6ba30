"""Delivery guarantees under faults: every acknowledged event is held exactly once, or
reported rejected with its reason; nothing is dropped, nothing is counted twice."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering_core import (
    AsyncMetering,
    AuthenticationError,
    IngestResult,
    MeterCreate,
    Metering,
    ProviderError,
    ProviderUnavailableError,
    QueueFullError,
    UsageEvent,
)
from metering_core.memory import MemoryProvider
from metering_core.spool import Spool
from tests.examples import examples
from tests.forks import said_in_a_child

from .faulty import FAULTS, FaultyProvider

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAST = {"linger": 0.0, "retry_backoff": 0.001, "delivery_timeout": 0.05, "max_attempts": 50}


def events(ids: list[str]) -> list[UsageEvent]:
    return [UsageEvent(id=i, event_name="api_calls", customer_id="t1", value=1) for i in ids]


async def run(
    provider: FaultyProvider, batches: list[list[str]], **options: object
) -> dict[str, set[str]]:
    async with AsyncMetering(provider, **{**FAST, **options}) as m:
        await provider.create_meter(MeterCreate(event_name="api_calls"))
        acknowledged: list[str] = []
        for batch in batches:
            acknowledged += await m.ingest_usage_events(events(batch))
        report = await m.flush()
    return {
        "acknowledged": set(acknowledged),
        "accepted": set(report.accepted),
        "duplicates": set(report.duplicates),
        "rejected": set(report.rejected),
    }


id_lists = st.lists(
    st.lists(st.sampled_from([f"e{i}" for i in range(30)]), min_size=1, max_size=15),
    min_size=1,
    max_size=6,
)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=id_lists,
    schedule=st.lists(st.sampled_from(FAULTS), max_size=12),
    rejected=st.sets(st.sampled_from([f"e{i}" for i in range(30)]), max_size=3),
    poisoned=st.sets(st.sampled_from([f"e{i}" for i in range(30)]), max_size=2),
    batch_size=st.integers(1, 12),
    concurrency=st.integers(1, 4),
)
def test_every_schedule_holds_exactly_the_acknowledged_events_once(
    batches: list[list[str]],
    schedule: list[str],
    rejected: set[str],
    poisoned: set[str],
    batch_size: int,
    concurrency: int,
) -> None:
    provider = FaultyProvider(
        schedule=list(schedule), rejected_ids=rejected, poisoned_ids=poisoned, batch_size=batch_size
    )
    outcome = asyncio.run(run(provider, batches, max_concurrency=concurrency))
    stored = provider.stored_ids()
    assert len(stored) == len(set(stored)), "an event was counted twice"
    refused = (rejected | poisoned) & outcome["acknowledged"]
    assert set(stored) == outcome["acknowledged"] - refused
    assert outcome["rejected"] == refused
    assert (
        outcome["accepted"] | outcome["duplicates"] | outcome["rejected"] == outcome["acknowledged"]
    )


def test_a_poisoned_event_does_not_sink_its_batch() -> None:
    provider = FaultyProvider(poisoned_ids={"e3"}, batch_size=8)
    outcome = asyncio.run(run(provider, [[f"e{i}" for i in range(8)]]))
    assert outcome["rejected"] == {"e3"}
    assert sorted(provider.stored_ids()) == sorted(f"e{i}" for i in range(8) if i != 3)


def test_giving_up_reports_every_event_with_the_reason() -> None:
    provider = FaultyProvider(schedule=["unavailable"] * 10)

    async def scenario() -> dict[str, str]:
        async with AsyncMetering(provider, **{**FAST, "max_attempts": 3}) as m:
            await m.create_meter(event_name="api_calls")
            await m.ingest_usage_events(events(["a", "b"]))
            return (await m.flush()).rejected

    rejected = asyncio.run(scenario())
    assert set(rejected) == {"a", "b"}
    assert "gave up after 3 attempts" in rejected["a"]
    assert "injected outage" in rejected["a"]
    assert provider.stored_ids() == []


def test_a_429_is_not_retried_before_retry_after() -> None:
    provider = FaultyProvider(schedule=["rate_limited"], retry_after=0.2)
    outcome = asyncio.run(run(provider, [["a"]]))
    assert outcome["accepted"] == {"a"}
    (first, _), (second, _) = provider.calls
    assert second - first >= 0.2


def test_a_hung_call_times_out_and_the_retry_counts_once() -> None:
    provider = FaultyProvider(schedule=["hang_after_storing"])
    outcome = asyncio.run(run(provider, [["a", "b"]]))
    assert outcome["duplicates"] == {"a", "b"}  # stored by the hung call, confirmed by the retry
    assert sorted(provider.stored_ids()) == ["a", "b"]


def test_a_full_queue_raises_after_the_timeout_and_drops_nothing() -> None:
    release = asyncio.Event()

    class Stuck(FaultyProvider):
        async def ingest_usage_events(self, batch):  # type: ignore[no-untyped-def]
            await release.wait()
            return await super().ingest_usage_events(batch)

    async def scenario() -> tuple[list[str], list[str]]:
        provider = Stuck(batch_size=5)
        async with AsyncMetering(
            provider, **{**FAST, "max_queue": 10, "delivery_timeout": 30}
        ) as m:
            await m.create_meter(event_name="api_calls")
            queued = await m.ingest_usage_events(events([f"e{i}" for i in range(10)]))
            began = time.monotonic()
            with pytest.raises(QueueFullError, match="max_queue=10"):
                await m.ingest_usage_event(event_name="api_calls", customer_id="t1", timeout=0.1)
            assert time.monotonic() - began >= 0.1
            release.set()
            report = await m.flush()
        return queued, report.accepted

    queued, accepted = asyncio.run(scenario())
    assert sorted(accepted) == sorted(queued)


def test_a_full_queue_blocks_a_sync_caller_until_there_is_room() -> None:
    provider = FaultyProvider(schedule=["unavailable"] * 3, batch_size=2)
    with Metering(provider, **{**FAST, "max_queue": 2, "retry_backoff": 0.05}) as m:
        provider_meter = m.create_meter(event_name="api_calls")
        began = time.monotonic()
        ids = [
            m.ingest_usage_event(event_name="api_calls", customer_id="t1", value=1)
            for _ in range(6)
        ]
        blocked = time.monotonic() - began
        report = m.flush()
        total = m.fetch_usage(
            provider_meter.id,
            start=EPOCH,
            end=EPOCH + timedelta(days=365 * 200),
        ).total
    assert blocked >= 0.05  # the caller waited for the outage to clear
    assert sorted(report.accepted) == sorted(ids)
    assert total == Decimal(6)


def test_a_failing_delivery_hook_does_not_lose_the_report(caplog: pytest.LogCaptureFixture) -> None:
    from metering_core import hookimpl, register_plugin
    from metering_core.plugins import unregister_plugin

    class Broken:
        @hookimpl
        def usage_delivered(self, provider, result):  # type: ignore[no-untyped-def]
            raise RuntimeError("observer crashed")

    broken = Broken()
    register_plugin(broken, name="broken-observer")
    try:
        outcome = asyncio.run(run(FaultyProvider(), [["a", "b"]]))
    finally:
        unregister_plugin(broken)
    assert outcome["accepted"] == {"a", "b"}
    assert "usage_delivered hook failed" in caplog.text


def test_an_id_left_out_once_is_sent_again_and_counted_once() -> None:
    class ForgetsOnce(FaultyProvider):
        forgot = False

        async def ingest_usage_events(self, batch):  # type: ignore[no-untyped-def]
            result = await super().ingest_usage_events(batch)
            if not self.forgot:
                self.forgot = True
                result.accepted.remove(batch[-1].id)  # stored, but not said
            return result

    provider = ForgetsOnce()
    outcome = asyncio.run(run(provider, [["a", "b", "c"]]))
    assert (outcome["accepted"], outcome["duplicates"]) == ({"a", "b"}, {"c"})
    assert sorted(provider.stored_ids()) == ["a", "b", "c"]
    assert [size for _, size in provider.calls] == [3, 1]  # only the missing id went again


def test_an_answer_repeating_one_id_for_the_batch_does_not_hide_the_others() -> None:
    class Repeats(FaultyProvider):
        async def ingest_usage_events(self, batch):  # type: ignore[no-untyped-def]
            self.calls.append((time.monotonic(), len(batch)))
            return IngestResult(accepted=["a"] * len(batch))  # as one backend answered

    provider = Repeats()
    outcome = asyncio.run(run(provider, [["a", "b", "c"]], max_attempts=3))
    assert outcome["accepted"] == {"a"}
    assert outcome["rejected"] == {"b", "c"}
    assert [size for _, size in provider.calls] == [3, 2, 2]


def test_ids_a_provider_keeps_leaving_out_are_rejected_with_that_reason(tmp_path: Path) -> None:
    class Forgetful(FaultyProvider):
        async def ingest_usage_events(self, batch):  # type: ignore[no-untyped-def]
            result = await super().ingest_usage_events(batch)
            result.duplicates = [i for i in result.duplicates if i != "c"]
            result.accepted = [i for i in result.accepted if i != "c"]
            return result

    with Metering(
        Forgetful(), spool_path=tmp_path / "spool.db", **{**FAST, "max_attempts": 4}
    ) as m:
        m.create_meter(event_name="api_calls")
        m.ingest_usage_events(events(["a", "b", "c"]))
        report = m.flush()
        assert set(report.accepted) == {"a", "b"}
        assert "left 1 id(s) of the batch out of its answer" in report.rejected["c"]
        assert [letter.id for letter in m.dead_letters()] == ["c"]


def test_a_provider_that_cannot_state_its_batch_size_yet_still_gets_the_spooled_events(
    tmp_path: Path,
) -> None:
    class Unreachable(FaultyProvider):
        """Like the HTTP provider while its service is down: even capabilities fail."""

        outage = 3

        async def load_capabilities(self):  # type: ignore[no-untyped-def]
            if self.outage > 0:
                self.outage -= 1
                raise ProviderUnavailableError("service down", provider="faulty")
            return await super().load_capabilities()

    spool = Spool(tmp_path / "spool.db")
    spool.add(events(["s1", "s2"]))
    spool.close()
    provider = Unreachable()
    asyncio.run(MemoryProvider.create_meter(provider, MeterCreate(event_name="api_calls")))
    with Metering(provider, spool_path=tmp_path / "spool.db", **FAST) as m:
        assert sorted(m.flush().accepted) == ["s1", "s2"]
    assert sorted(provider.stored_ids()) == ["s1", "s2"]


@dataclass
class BadKey(FaultyProvider):
    """A provider refusing our credentials until it is fixed (`fixed_after` calls)."""

    fixed_after: int = 10**9

    async def ingest_usage_events(self, batch):  # type: ignore[no-untyped-def]
        self.calls.append((time.monotonic(), len(batch)))
        if len(self.calls) <= self.fixed_after:
            raise AuthenticationError("bad key", provider="faulty", status_code=401)
        return await MemoryProvider.ingest_usage_events(self, batch)


def test_a_failure_no_event_causes_is_retried_whole_and_never_split() -> None:
    provider = BadKey(batch_size=8)
    outcome = asyncio.run(run(provider, [[f"e{i}" for i in range(8)]], max_attempts=4))
    assert outcome["rejected"] == {f"e{i}" for i in range(8)}
    assert [size for _, size in provider.calls] == [8, 8, 8, 8]


def test_with_a_spool_refused_credentials_wait_until_fixed_and_make_no_dead_letter(
    tmp_path: Path,
) -> None:
    """Dead letters are only for events refused as data: a bad key fixed after the events
    were spooled still bills them all (they were dead letters, never billed)."""
    provider = BadKey(batch_size=8, fixed_after=12)
    with Metering(provider, spool_path=tmp_path / "spool.db", **{**FAST, "max_attempts": 3}) as m:
        asyncio.run(MemoryProvider.create_meter(provider, MeterCreate(event_name="api_calls")))
        m.ingest_usage_events(events([f"e{i}" for i in range(8)]))
        report = m.flush(timeout=10)
        assert (sorted(report.accepted), report.rejected) == (sorted(f"e{i}" for i in range(8)), {})
        assert m.dead_letters() == []
    assert len(provider.calls) > 12  # every refused call retried, past max_attempts


def test_nothing_is_acknowledged_once_closing_has_begun() -> None:
    """Ingesting from one thread while another closes: every id that was returned is
    delivered, and every later call raises. An id returned after the close's last flush
    was never delivered (no error, no event)."""
    import threading

    provider = FaultyProvider()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    m = Metering(provider, linger=0)
    acknowledged: list[str] = []
    refused: list[BaseException] = []
    started = threading.Event()

    def ingest() -> None:
        for n in range(100_000):
            try:
                acknowledged.append(
                    m.ingest_usage_event(id=f"x{n}", event_name="api_calls", customer_id="t1")
                )
            except RuntimeError as exc:
                refused.append(exc)
                return
            started.set()

    writer = threading.Thread(target=ingest)
    writer.start()
    started.wait(10)
    m.close()
    writer.join(10)
    assert "closed" in str(refused[0])
    assert acknowledged
    assert sorted(provider.stored_ids()) == sorted(acknowledged)
    with pytest.raises(RuntimeError, match="closed"):
        m.ingest_usage_event(event_name="api_calls", customer_id="t1")


class SlowForOneCustomer(FaultyProvider):
    """Memory, but a call holding an event of customer "slow" takes half a second."""

    async def ingest_usage_events(self, events: Sequence[UsageEvent]) -> IngestResult:
        if any(event.customer_id == "slow" for event in events):
            await asyncio.sleep(0.5)
        return await FaultyProvider.ingest_usage_events(self, events)


async def test_flush_waits_for_its_own_events_not_a_count_that_later_ones_can_fill() -> None:
    """A flush waits for the events queued before it. Events queued after it that settle
    first (a faster batch) used to fill the count it waited for, and it returned with its
    own still in flight."""
    provider = SlowForOneCustomer()
    await provider.create_meter(MeterCreate(event_name="api_calls"))
    async with AsyncMetering(provider, linger=0, max_concurrency=4) as m:
        await m.ingest_usage_event(id="mine", event_name="api_calls", customer_id="slow")
        flushing = asyncio.create_task(m.flush())
        await asyncio.sleep(0.05)
        await m.ingest_usage_event(id="later", event_name="api_calls", customer_id="fast")
        report = await flushing
        assert "mine" in report.accepted
        assert "mine" in provider.stored_ids()


def test_a_client_used_from_a_second_event_loop_refuses_before_acknowledging(
    tmp_path: Path,
) -> None:
    """The batching task runs in the loop the client was first used in; once that loop is
    gone (a second asyncio.run), events queued from another were acknowledged, committed
    to the spool, and never sent. Now nothing is acknowledged or committed there."""
    provider = FaultyProvider()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    m = AsyncMetering(provider, linger=0, spool_path=tmp_path / "spool.db")

    async def first() -> None:
        await m.ingest_usage_event(id="one", event_name="api_calls", customer_id="t1")
        await m.flush()

    async def second() -> None:
        with pytest.raises(RuntimeError, match="event loop"):
            await m.ingest_usage_event(id="two", event_name="api_calls", customer_id="t1")

    asyncio.run(first())
    asyncio.run(second())
    assert provider.stored_ids() == ["one"]
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as outbox:
        assert outbox.execute("SELECT id FROM outbox").fetchall() == []  # nothing committed


@pytest.mark.parametrize("fork", ["os.fork", "libc fork"])
def test_a_client_created_before_a_fork_refuses_in_the_child(tmp_path: Path, fork: str) -> None:
    """A child process (gunicorn --preload, multiprocessing; uWSGI's workers, forked from
    C without Python's at-fork hooks) inherits the client but not its delivery: an event
    acknowledged there was never delivered."""
    import ctypes
    import os

    forked = os.fork if fork == "os.fork" else ctypes.CDLL(None).fork

    provider = FaultyProvider()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    with Metering(provider, linger=0) as m:
        m.ingest_usage_event(id="parent", event_name="api_calls", customer_id="t1")
        m.flush()

        def ingest() -> str:
            m.ingest_usage_event(id="child", event_name="api_calls", customer_id="t1")
            return "acknowledged"

        said = said_in_a_child(ingest, fork=forked)
    assert "before a fork" in said
    assert provider.stored_ids() == ["parent"]


@dataclass
class BugOnOneEvent(FaultyProvider):
    """A provider failing (not as a refusal of data) on any batch holding one event: a bug
    of its own on that event's content."""

    async def ingest_usage_events(self, batch):  # type: ignore[no-untyped-def]
        self.calls.append((time.monotonic(), len(batch)))
        if any(event.id == "bug" for event in batch):
            raise ProviderError("failed on it", provider="faulty", retryable=False)
        return await MemoryProvider.ingest_usage_events(self, batch)


def test_with_a_spool_one_events_failure_holds_only_that_event(tmp_path: Path) -> None:
    """The batch is halved after max_attempts: the good events land, and the one the
    provider fails on keeps waiting in the spool (never a dead letter: it was not refused
    as data). Whole, it held all 99 others forever."""
    provider = BugOnOneEvent(batch_size=100)
    with Metering(provider, spool_path=tmp_path / "spool.db", **{**FAST, "max_attempts": 3}) as m:
        asyncio.run(MemoryProvider.create_meter(provider, MeterCreate(event_name="api_calls")))
        m.ingest_usage_events(events([*(f"g{i}" for i in range(99)), "bug"]))
        with pytest.raises(TimeoutError):
            m.flush(timeout=3)
        assert sorted(provider.stored_ids()) == sorted(f"g{i}" for i in range(99))
        assert m.dead_letters() == []
