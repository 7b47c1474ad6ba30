"""Where a forwarder's next claim starts: past what its full claims took, and from the head
again whenever rows behind that point may be free (the end reached, rows given back, a
sweep due), so no owed row is left behind it for longer than a sweep."""

from __future__ import annotations

import asyncio

import pytest

from metering_core.sql import claim_cursor
from metering_core.sql.claim_cursor import ClaimCursor

SWEEP = 30.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The cursor's monotonic clock, set by the test."""
    now = [1000.0]
    monkeypatch.setattr(claim_cursor.time, "monotonic", lambda: now[0])
    return now


def test_each_full_claim_starts_the_next_past_it(clock: list[float]) -> None:
    cursor = ClaimCursor()
    first = cursor.start("billing", sweep=SWEEP)
    assert first.after == 0
    cursor.claimed("billing", first, 100, full=True)
    second = cursor.start("billing", sweep=SWEEP)
    assert second.after == 100
    cursor.claimed("billing", second, 200, full=True)
    assert cursor.start("billing", sweep=SWEEP).after == 200
    assert cursor.start("other", sweep=SWEEP).after == 0  # each mirror its own


def test_a_claim_finishing_late_never_moves_the_cursor_back(clock: list[float]) -> None:
    cursor = ClaimCursor()
    start = cursor.start("billing", sweep=SWEEP)
    cursor.claimed("billing", start, 200, full=True)
    cursor.claimed("billing", start, 100, full=True)
    assert cursor.start("billing", sweep=SWEEP).after == 200


def test_a_claim_that_reached_the_end_sends_the_next_to_the_head(clock: list[float]) -> None:
    """Fewer rows than asked: nothing was free past them, and a row committed late behind
    the cursor (its seq taken first by a slower writer) would wait for the next sweep."""
    cursor = ClaimCursor()
    start = cursor.start("billing", sweep=SWEEP)
    cursor.claimed("billing", start, 100, full=True)
    start = cursor.start("billing", sweep=SWEEP)
    cursor.claimed("billing", start, 150, full=False)
    assert cursor.start("billing", sweep=SWEEP).after == 0


def test_rows_given_back_during_a_claim_are_looked_for_after_it(clock: list[float]) -> None:
    """A pass gives rows back while another's claim is in flight: that claim's outcome
    must not carry the cursor past them again."""
    cursor = ClaimCursor()
    cursor.claimed("billing", cursor.start("billing", sweep=SWEEP), 100, full=True)
    in_flight = cursor.start("billing", sweep=SWEEP)
    cursor.restart("billing")  # a sibling pass gave rows back
    cursor.claimed("billing", in_flight, 200, full=True)
    restarted = cursor.start("billing", sweep=SWEEP)
    assert restarted.after == 0
    cursor.claimed("billing", restarted, 300, full=True)  # a claim begun after: moves it
    assert cursor.start("billing", sweep=SWEEP).after == 300


def test_a_sweep_starts_from_the_head_when_the_last_is_that_old(clock: list[float]) -> None:
    """A dead forwarder's rows come free when its lease runs out, behind a cursor that a
    long backlog would otherwise keep ahead of them until the end."""
    cursor = ClaimCursor()
    cursor.claimed("billing", cursor.start("billing", sweep=SWEEP), 100, full=True)
    clock[0] += SWEEP - 1
    start = cursor.start("billing", sweep=SWEEP)
    assert start.after == 100
    cursor.claimed("billing", start, 200, full=True)
    clock[0] += 1
    swept = cursor.start("billing", sweep=SWEEP)
    assert swept.after == 0
    cursor.claimed("billing", swept, 300, full=True)
    clock[0] += SWEEP - 1  # the sweep's clock starts again at the sweep
    assert cursor.start("billing", sweep=SWEEP).after == 300


def test_claims_take_turns_in_each_event_loop() -> None:
    """One turn at a time per mirror; a loop closed and another begun (the sync facade,
    a test's asyncio.run) gets its own lock rather than one bound to the old loop."""
    cursor = ClaimCursor()
    order: list[str] = []

    async def claim(name: str, mirror: str) -> None:
        async with cursor.turn(mirror):
            order.append(f"{name} in")
            await asyncio.sleep(0.01)
            order.append(f"{name} out")

    async def three() -> None:
        await asyncio.gather(claim("a", "billing"), claim("b", "billing"), claim("c", "other"))

    for _ in range(2):
        order.clear()
        asyncio.run(three())
        assert order.index("a out") < order.index("b in")  # one mirror: in turn
        assert order.index("c in") < order.index("a out")  # another mirror: alongside
