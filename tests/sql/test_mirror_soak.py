"""The ledger's promise under a hostile mirror: it fails 30 % of the requests (half before
storing what it was sent, half after, the answer lost), goes down for 20 s, and the
forwarder (`metering mirror run`, a process of its own) is killed with SIGKILL three
times just after the mirror stored one of its batches, while usage keeps arriving.
Afterwards reconcile finds no drift, and the mirror took every event exactly once. The
mirror is the HTTP provider before a real service, and the fake Stripe through the real
stripe SDK (its `chaos` switch)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from metering_core import AsyncMetering, CellStatus, Metering, UsageEvent
from metering_core.server import create_app
from metering_core.testing.serving import serve_in_thread

from .test_mirrors import KEYS, billing, mirror_outcomes

pytest.importorskip("metering_http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

AT = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
ROUNDS, PER_ROUND = 30, 100
KILLS_AT = (4, 11, 19)  # the mirror's ingest requests from which the forwarder dies
OUTAGE = 20.0


class Chaos:
    """In front of the mirror's service: fails a share of the writes, goes down when told,
    and kills the forwarder just after the mirror stored the batch of chosen requests."""

    def __init__(self, app: Any, kill: Callable[[], None]) -> None:
        self.app = app
        self.kill = kill
        self.random = random.Random(20)
        self.down = False
        self.ingests = 0
        self.kills = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writes = scope["type"] == "http" and scope["method"] in ("POST", "PUT", "DELETE")
        if not writes:
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/usage" and scope["method"] == "POST":
            self.ingests += 1
            due = self.kills < len(KILLS_AT) and self.ingests >= KILLS_AT[self.kills]
            if due and not self.down:
                # counted before the mirror's work is awaited: a request arriving meanwhile
                # was due too, and killed the forwarder started after this one's kill
                self.kills += 1
                await self._answer_lost(scope, receive)
                self.kill()
                await _fail(send, 502)
                return
        roll = self.random.random()
        if self.down or roll < 0.15:
            await _fail(send, 503)
        elif roll < 0.30:
            await self._answer_lost(scope, receive)
            await _fail(send, 502)
        else:
            await self.app(scope, receive, send)

    async def _answer_lost(self, scope: Scope, receive: Receive) -> None:
        """The mirror does the work; its answer never reaches the forwarder."""

        async def dropped(message: MutableMapping[str, Any]) -> None:
            return None

        await self.app(scope, receive, dropped)


async def _fail(send: Send, status: int) -> None:
    body = json.dumps({"error": "chaos", "message": "injected failure"}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Forwarder:
    """`metering mirror run` over the ledger, restarted whenever it dies."""

    def __init__(self, ledger_url: str, mirrors: dict[str, Any], tmp_path: Path) -> None:
        self.env = {
            **os.environ,
            "METERING_PROVIDER": "sql",
            "METERING_SQL_URL": ledger_url,
            "METERING_SQL_MIRRORS": json.dumps(mirrors),
            "METERING_SQL_MIRROR_LEASE": "2",
            "METERING_MAX_ATTEMPTS": "3",
        }
        self.log = (tmp_path / "forwarder.log").open("ab")
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._supervise, daemon=True)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "metering_core.cli", "mirror", "run"],
            env=self.env,
            stdout=self.log,
            stderr=self.log,
        )
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)

    def _supervise(self) -> None:
        while not self.stopping:
            if self.process is not None and self.process.poll() is not None:
                self.start()
            time.sleep(0.1)

    def __enter__(self) -> Forwarder:
        self.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        self.thread.join()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()


def usage(round_: int) -> list[UsageEvent]:
    return [
        UsageEvent(
            id=f"r{round_}-{n}",
            event_name="calls",
            customer_id=f"t{n % 5}",
            value=Decimal(n % 7 + 1),
            timestamp=AT + timedelta(seconds=(round_ * PER_ROUND + n) / 10),  # within the hour
        )
        for n in range(PER_ROUND)
    ]


class Hostile(Protocol):
    """A mirror's chaos, as the soak drives it."""

    kills: int
    down: bool


def soak(ledger: Metering, chaos: Hostile, forwarder: Forwarder) -> int:
    """The meter and five customers, then usage in rounds (some sent twice, one of each
    cancelled) while the chaos kills the forwarder; after the second kill the mirror goes
    down for `OUTAGE` seconds. Returns, with the rounds sent, once the mirror has been
    sent everything."""
    ledger.create_meter(event_name="calls")  # the mirror's meter and customers follow
    for tenant in range(5):
        ledger.create_customer(id=f"t{tenant}")
    rounds = 0
    outage: threading.Timer | None = None
    while rounds < ROUNDS or chaos.kills < len(KILLS_AT):  # usage keeps arriving
        assert rounds < 10 * ROUNDS, (chaos.kills, forwarder.starts)
        round_, rounds = rounds, rounds + 1
        sent = usage(round_)
        ledger.ingest_usage_events([*sent, *sent[:10]])  # some sent twice
        ledger.cancel_usage_events([f"r{round_}-0"])
        if chaos.kills == 2 and outage is None:  # and then the mirror goes away
            chaos.down = True
            outage = threading.Timer(OUTAGE, lambda: setattr(chaos, "down", False))
            outage.start()
        time.sleep(0.3)
    assert outage is not None  # the mirror went down
    deadline = time.monotonic() + OUTAGE + 90
    while chaos.kills < len(KILLS_AT) or chaos.down or ledger.mirror_status()[0].depth:
        assert time.monotonic() < deadline, (chaos.kills, ledger.mirror_status())
        time.sleep(0.5)
    return rounds


@pytest.fixture(params=["sqlite_url", "postgres_url"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(request.param)
    return url


def test_no_drift_after_failures_an_outage_and_three_kills(ledger_url: str, tmp_path: Path) -> None:
    behind = AsyncMetering("memory")
    forwarder: Forwarder | None = None

    def kill() -> None:
        assert forwarder is not None
        forwarder.kill()

    chaos = Chaos(create_app(behind, keys=KEYS), kill)
    with serve_in_thread(chaos) as mirror_url:
        with (
            # the forwarder killed is the only one: this process's would share its rows
            Metering(
                "sql", url=ledger_url, mirrors=billing(mirror_url), linger=0, mirror_forwarder=False
            ) as ledger,
            Forwarder(ledger_url, billing(mirror_url), tmp_path) as forwarder,
        ):
            rounds = soak(ledger, chaos, forwarder)

            [status] = ledger.mirror_status()
            report = ledger.reconcile("billing", start=AT, end=AT + timedelta(hours=1))

        assert forwarder.starts == 1 + len(KILLS_AT)
        assert (status.depth, status.dead_letters) == (0, 0)
        assert report.ok
        assert {cell.status for cell in report.cells} == {CellStatus.equal}
        assert len(report.cells) == 5  # five customers, one window each
        stored = rounds * PER_ROUND
        assert sum(cell.mirror or 0 for cell in report.cells) == sum(
            event.value for round_ in range(rounds) for event in usage(round_)[1:]
        )
        outcomes = mirror_outcomes(mirror_url)
        # Each event taken once; one cancelled here before it was forwarded is never sent.
        assert stored - rounds <= outcomes["accepted"] <= stored
        assert outcomes["duplicate"] > 0  # batches were sent again, and counted once
        assert httpx.get(f"{mirror_url}/health").status_code == 200


class StripeChaos:
    """The same hostility as `Chaos`, in the fake Stripe's terms (its writes): a share
    failed before acting or acted on with the answer lost, an outage when told, and the
    forwarder killed as the chosen meter event streams are stored."""

    def __init__(self, kill: Callable[[], None]) -> None:
        self.kill = kill
        self.random = random.Random(22)
        self.down = False
        self.streams = 0
        self.kills = 0
        self.lock = threading.Lock()  # the fake serves each request on a thread

    def __call__(self, method: str, path: str) -> str | None:
        if method != "POST":
            return None
        with self.lock:
            if path == "/v2/billing/meter_event_stream":
                self.streams += 1
                due = self.kills < len(KILLS_AT) and self.streams >= KILLS_AT[self.kills]
                if due and not self.down:
                    self.kills += 1
                    self.kill()  # dies with the batch in flight; the fake stores it
                    return "lose"
            roll = self.random.random()
        if self.down or roll < 0.15:
            return "fail"
        return "lose" if roll < 0.30 else None


def test_no_drift_in_stripe_after_failures_an_outage_and_three_kills(
    ledger_url: str, tmp_path: Path
) -> None:
    from metering_stripe.testing import FakeStripe

    forwarder: Forwarder | None = None

    def kill() -> None:
        assert forwarder is not None
        forwarder.kill()

    chaos = StripeChaos(kill)
    key = "sk_test_soak"
    with FakeStripe(api_key=key) as fake:
        mirrors = {"billing": {"provider": "stripe", "api_key": key, "base_url": fake.url}}
        fake.chaos = chaos
        with (
            Metering(
                "sql", url=ledger_url, mirrors=mirrors, linger=0, mirror_forwarder=False
            ) as ledger,
            Forwarder(ledger_url, mirrors, tmp_path) as forwarder,
        ):
            rounds = soak(ledger, chaos, forwarder)

            [status] = ledger.mirror_status()
            report = ledger.reconcile(
                "billing", start=AT, end=AT + timedelta(hours=1), window="hour"
            )

        assert forwarder.starts == 1 + len(KILLS_AT)
        assert (status.depth, status.dead_letters) == (0, 0)
        assert {cell.status for cell in report.cells} == {CellStatus.equal}, report.cells
        assert len(report.cells) == 5
        assert sum(cell.mirror or 0 for cell in report.cells) == sum(
            event.value for round_ in range(rounds) for event in usage(round_)[1:]
        )
        # Stripe holds each live event once (by identifier) and counts no cancelled one;
        # what it was sent again it refused as a duplicate, and nothing else.
        live = {e.id for round_ in range(rounds) for e in usage(round_)[1:]}
        assert {i for i, e in fake.state.events.items() if not e.cancelled} == live
        assert len(fake.state.customers) == 5  # a customer created twice would show here
        refusals = {error["message"].split("`")[0] for error in fake.state.stream_errors}
        assert refusals <= {"An event with identifier "}, refusals
