"""With a spool, ingestion never needs the provider, and outages never become dead letters."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from metering_core import (
    IngestResult,
    MeterCreate,
    Metering,
    ProviderUnavailableError,
    UsageEvent,
)
from metering_core.spool import Spool

from .faulty import FaultyProvider


def pending(path: Path) -> list[UsageEvent]:
    """What the spool at `path` still holds (opened and closed, so its lock is free)."""
    spool = Spool(path)
    try:
        return spool.pending()
    finally:
        spool.close()


class Outage(FaultyProvider):
    """Unavailable (503) until a moment on the monotonic clock, then memory."""

    until: float = 0.0

    async def ingest_usage_events(self, events: Sequence[UsageEvent]) -> IngestResult:
        self.calls.append((time.monotonic(), len(events)))
        if time.monotonic() < self.until:
            raise ProviderUnavailableError("injected outage", provider="faulty", status_code=503)
        return await FaultyProvider.ingest_usage_events(self, events)


def test_a_twenty_second_outage_with_a_spool_delivers_everything_once_with_defaults(
    tmp_path: Path,
) -> None:
    provider = Outage(batch_size=25)
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    provider.until = time.monotonic() + 20
    with Metering(provider, spool_path=tmp_path / "spool.db") as m:  # default settings
        ids = [
            m.ingest_usage_event(id=f"e{i}", event_name="api_calls", customer_id="t1")
            for i in range(150)
        ]
        report = m.flush(timeout=60)
        assert sorted(report.accepted) == sorted(ids)
        assert report.rejected == {}
        assert m.dead_letters() == []
    assert sorted(provider.stored_ids()) == sorted(ids)
    assert pending(tmp_path / "spool.db") == []


def test_without_a_spool_the_retry_budget_ends_and_says_why() -> None:
    provider = Outage()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    provider.until = time.monotonic() + 3600
    with Metering(provider, retry_backoff=0.001, max_attempts=3, linger=0) as m:
        m.ingest_usage_event(id="a", event_name="api_calls", customer_id="t1")
        rejected = m.flush().rejected
    assert "gave up after 3 attempts" in rejected["a"]
    assert "injected outage" in rejected["a"]


def test_closing_during_an_outage_leaves_the_events_in_the_spool_for_the_next_start(
    tmp_path: Path,
) -> None:
    provider = Outage()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    provider.until = time.monotonic() + 3600
    began = time.monotonic()
    with Metering(provider, spool_path=tmp_path / "spool.db", delivery_timeout=0.5) as m:
        m.ingest_usage_event(id="a", event_name="api_calls", customer_id="t1", value=2)
    assert time.monotonic() - began < 5
    assert [e.id for e in pending(tmp_path / "spool.db")] == ["a"]
    provider.until = 0
    with Metering(provider, spool_path=tmp_path / "spool.db", linger=0) as m:
        assert m.flush().accepted == ["a"]
    assert provider.stored_ids() == ["a"]


def test_the_http_provider_down_at_start_still_spools_and_acknowledges(tmp_path: Path) -> None:
    pytest.importorskip("metering_http")
    spool = tmp_path / "spool.db"
    began = time.monotonic()
    with Metering(
        "http", base_url="http://127.0.0.1:1", spool_path=spool, delivery_timeout=0.5
    ) as m:
        event_id = m.ingest_usage_event(event_name="api_calls", customer_id="t1", value=7)
    assert time.monotonic() - began < 5
    [left] = pending(spool)
    assert (left.id, left.value) == (event_id, Decimal(7))


def test_a_corrupt_spool_is_a_configuration_error_and_leaves_no_lock(tmp_path: Path) -> None:
    from metering_core import ConfigurationError

    spool = tmp_path / "spool.db"
    spool.write_bytes(b"this is not a database" * 100)
    for _ in range(2):  # a second try is not told "in use by another process"
        with pytest.raises(ConfigurationError, match="cannot be opened") as caught:
            Metering("memory", spool_path=spool)
        assert str(spool) in str(caught.value)
        assert "another process" not in str(caught.value)
    spool.unlink()
    with Metering("memory", spool_path=spool):
        pass


def test_a_spool_whose_lock_cannot_be_created_is_a_configuration_error(tmp_path: Path) -> None:
    from metering_core import ConfigurationError

    spool = tmp_path / "spool.db"
    (tmp_path / "spool.db.lock").mkdir()  # as a read-only place would: the lock cannot open
    with pytest.raises(ConfigurationError, match=r"spool\.db\.lock"):
        Metering("memory", spool_path=spool)


def test_one_tampered_row_becomes_a_dead_letter_and_the_others_are_delivered(
    tmp_path: Path,
) -> None:
    import sqlite3

    path = tmp_path / "spool.db"
    outbox = Spool(path)
    outbox.add(
        [UsageEvent(id=f"e{i}", event_name="api_calls", customer_id="t1") for i in range(2000)]
    )
    outbox.close()
    with sqlite3.connect(path) as db:
        db.execute('UPDATE outbox SET event = \'{"id": "e7", "value": "NaN"}\' WHERE id = \'e7\'')
    provider = FaultyProvider(batch_size=500)
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    with Metering(provider, spool_path=path, linger=0) as m:
        assert len(m.flush().accepted) == 1999
        [letter] = m.dead_letters()
        assert (letter.id, letter.event) == ("e7", None)
        assert "unreadable spool row" in letter.reason
        assert "NaN" in letter.raw
        assert m.retry_dead_letters() == []  # nothing deliverable in it
    assert len(provider.stored_ids()) == 1999


def test_an_event_resent_under_a_rejected_id_keeps_its_own_spool_row(tmp_path: Path) -> None:
    """The first send is refused for good; the corrected resend (same id) waits out an
    outage: settling the refusal must not delete the resend's row."""
    provider = Outage()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    path = tmp_path / "spool.db"
    with Metering(provider, spool_path=path, linger=0, delivery_timeout=0.3) as m:
        m.ingest_usage_event(id="order-42", event_name="no_meter", customer_id="t1")
        assert "no meter" in m.flush().rejected["order-42"]
        provider.until = time.monotonic() + 3600
        m.ingest_usage_event(id="order-42", event_name="api_calls", customer_id="t1", value=5)
    [kept] = pending(path)
    assert (kept.id, kept.event_name, kept.value) == ("order-42", "api_calls", Decimal(5))


def test_a_row_of_bad_bytes_or_a_mismatched_id_is_a_dead_letter(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "spool.db"
    outbox = Spool(path)
    outbox.add([UsageEvent(id=f"e{i}", event_name="api_calls", customer_id="t1") for i in range(3)])
    outbox.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE outbox SET event = CAST(X'7B22FF22' AS TEXT) WHERE id = 'e0'")
        db.execute("UPDATE outbox SET id = 'other' WHERE id = 'e1'")
    provider = FaultyProvider()
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    with Metering(provider, spool_path=path, linger=0) as m:
        assert m.flush().accepted == ["e2"]
        letters = {letter.id: letter.reason for letter in m.dead_letters()}
    assert sorted(letters) == ["e0", "e1"]
    assert "Invalid JSON" in letters["e0"]
    assert "its id column 'other' is not its event's" in letters["e1"]


def test_a_damaged_page_is_a_configuration_error_and_the_lock_is_released(tmp_path: Path) -> None:
    from metering_core import ConfigurationError

    path = tmp_path / "spool.db"
    outbox = Spool(path)
    outbox.add(
        [UsageEvent(id=f"e{i}" * 20, event_name="api_calls", customer_id="t1") for i in range(3000)]
    )
    outbox.close()
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="cannot be opened"):
            Metering("memory", spool_path=path)


class HoldsOneEventName(FaultyProvider):
    """Memory, but a call holding events of `held` hangs (an answer that never comes)."""

    held: str = ""

    async def ingest_usage_events(self, events: Sequence[UsageEvent]) -> IngestResult:
        if any(event.event_name == self.held for event in events):
            self.calls.append((time.monotonic(), len(events)))
            await asyncio.sleep(3600)
        return await FaultyProvider.ingest_usage_events(self, events)


def test_a_refused_copy_settling_first_keeps_the_row_of_the_valid_copy_in_flight(
    tmp_path: Path,
) -> None:
    """The valid event's delivery is slow; a copy under the same id with a typo is refused
    meanwhile. Settling the refusal removed the oldest row with that id, the valid one's:
    closing then left only the typo in the spool, and the valid usage was lost."""
    provider = HoldsOneEventName()
    provider.held = "api_calls"
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    path = tmp_path / "spool.db"
    with Metering(provider, spool_path=path, linger=0, delivery_timeout=0.3) as m:
        m.ingest_usage_event(id="order-42", event_name="api_calls", customer_id="t1", value=5)
        deadline = time.monotonic() + 10
        while not provider.calls and time.monotonic() < deadline:  # its delivery is out
            time.sleep(0.01)
        m.ingest_usage_event(id="order-42", event_name="api_callz", customer_id="t1", value=5)
        while not m.dead_letters() and time.monotonic() < deadline:
            time.sleep(0.02)
        [dead] = m.dead_letters()
        assert dead.event is not None
        assert dead.event.event_name == "api_callz"
    [kept] = pending(path)
    assert (kept.id, kept.event_name, kept.value) == ("order-42", "api_calls", Decimal(5))


def test_a_provider_call_ending_cancelled_is_retried_not_dropped() -> None:
    """A provider whose own task is torn down raises CancelledError into the delivery:
    the events were acknowledged, so they are retried, delivered and reported."""
    provider = FaultyProvider(schedule=["cancelled"])
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    with Metering(provider, linger=0, retry_backoff=0.01) as m:
        ids = [m.ingest_usage_event(event_name="api_calls", customer_id="t1") for _ in range(3)]
        report = m.flush(timeout=10)
    assert sorted(report.accepted) == sorted(ids)
    assert sorted(provider.stored_ids()) == sorted(ids)


def test_a_transaction_refused_by_another_programs_lock_is_rolled_back(tmp_path: Path) -> None:
    """A backup tool or an sqlite3 shell holding the write lock fails one commit; the
    spool then works again. Left open, that transaction made every later write fail."""
    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool._db.execute("PRAGMA busy_timeout = 50")  # fail fast instead of waiting 5 s
    other = sqlite3.connect(path, isolation_level=None)
    event = UsageEvent(id="e1", event_name="api_calls", customer_id="t1")
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            spool.add([event])
        other.execute("ROLLBACK")
        spool.add([event])
    finally:
        other.close()
        spool.close()
    assert [e.id for e in pending(path)] == ["e1"]


class SlowPerEvent(FaultyProvider):
    """Memory, but each call takes 50 ms per event it carries before storing them."""

    async def ingest_usage_events(self, events: Sequence[UsageEvent]) -> IngestResult:
        await asyncio.sleep(0.05 * len(events))
        return await FaultyProvider.ingest_usage_events(self, events)


def test_a_batch_too_slow_for_the_delivery_timeout_is_halved_until_it_lands(
    tmp_path: Path,
) -> None:
    """Twenty events take a second to deliver and the timeout is 0.3 s: sent whole, the
    batch timed out forever (with a spool, retries never end) and was never billed."""
    provider = SlowPerEvent()
    provider.batch_size = 20
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    path = tmp_path / "spool.db"
    options = {"linger": 0.05, "delivery_timeout": 0.3, "retry_backoff": 0.01}
    with Metering(provider, spool_path=path, **options) as m:
        ids = m.ingest_usage_events(
            [{"event_name": "api_calls", "customer_id": "t1"} for _ in range(20)]
        )
        report = m.flush(timeout=30)
    assert sorted(report.accepted) == sorted(ids)
    assert sorted(provider.stored_ids()) == sorted(ids)
    assert pending(path) == []


def test_closing_during_an_outage_releases_callers_waiting_for_room(tmp_path: Path) -> None:
    """The close leaves the queue in the spool, so no room ever comes: a caller waiting for
    it raised nothing and waited forever, and a flush after the close never returned."""
    import threading

    provider = Outage(batch_size=1)  # one event in flight, the others queued behind it
    provider.until = time.monotonic() + 3600
    asyncio.run(provider.create_meter(MeterCreate(event_name="api_calls")))
    options = {"max_queue": 3, "max_concurrency": 1, "delivery_timeout": 0.2}
    m = Metering(provider, spool_path=tmp_path / "spool.db", **options)
    outcome: list[BaseException] = []

    def fill() -> None:
        try:
            for n in range(0, 9, 3):
                m.ingest_usage_events(
                    [
                        {"id": f"w{i}", "event_name": "api_calls", "customer_id": "t1"}
                        for i in range(n, n + 3)
                    ]
                )
        except RuntimeError as exc:
            outcome.append(exc)

    writer = threading.Thread(target=fill)
    writer.start()
    deadline = time.monotonic() + 10
    while m.stats().queue_depth < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    m.close()
    writer.join(5)
    assert not writer.is_alive()
    assert "closed" in str(outcome[0])
    began = time.monotonic()
    assert m.flush(timeout=5) == IngestResult()
    assert time.monotonic() - began < 1
    assert [event.id for event in pending(tmp_path / "spool.db")] == ["w0", "w1", "w2"]
