"""The sql store as the ledger, with Stripe as its billing mirror: meters and customers
follow the ledger there, usage reaches Stripe once, and reconcile proves the two agree
(the real stripe SDK against the fake Stripe on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from metering_stripe import StripeProvider
from metering_stripe.capabilities import PROCESSING_DELAY
from metering_stripe.provider import TENANT_KEY
from metering_stripe.testing import FakeStripe

from metering_core import (
    AsyncMetering,
    CellStatus,
    CustomerCreate,
    LinkOutcome,
    MeterCreate,
    Metering,
    UsageEvent,
    ValidationError,
)
from metering_core.server import create_app
from metering_core.sql import SqlSettings
from metering_core.sql.provider import SqlProvider
from metering_core.sql.schema import mirror_deliveries, mirror_repairs
from metering_core.testing.serving import serve_in_thread

from .conftest import API_KEY, settings_for


def stripe_mirror(fake: FakeStripe) -> dict[str, Any]:
    return {"billing": {"provider": "stripe", "api_key": API_KEY, "base_url": fake.url}}


async def after_stripe_processed(ledger: AsyncMetering) -> None:
    """Stripe's processing delay passes (its summaries show what it took): reconcile holds
    the windows delivered to within it pending, and compares them after."""
    provider = ledger.provider
    assert isinstance(provider, SqlProvider)
    later = int((PROCESSING_DELAY + timedelta(minutes=1)).total_seconds() * 1e6)
    async with provider._transaction() as connection:
        await connection.execute(
            sa.update(mirror_deliveries).values(
                delivered_at=mirror_deliveries.c.delivered_at - later
            )
        )


def hours_ago(hours: int) -> datetime:
    """The start of the hour `hours` hours ago: inside Stripe's 35 days, and past."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours)


def acme_events(name: str, at: datetime, count: int) -> list[UsageEvent]:
    """`count` events of `name` for the customer acme at `at`, ids `{name}-0`, …"""
    return [
        UsageEvent(id=f"{name}-{n}", event_name=name, customer_id="acme", timestamp=at)
        for n in range(count)
    ]


async def test_usage_reaches_stripe_once_and_reconciles(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(2)
    async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as ledger:
        with pytest.raises(ValidationError) as refused:
            await ledger.create_meter(event_name="peak", aggregation="max")
        assert refused.value.field == "aggregation"
        assert "mirror 'billing' has no 'max' aggregation" in str(refused.value)
        assert (await ledger.fetch_all_meters()).items == []  # refused before the ledger had it

        await ledger.create_meter(event_name=name)
        for tenant in ("acme", "globex"):
            await ledger.create_customer(id=tenant)
        sent = [
            UsageEvent(
                id=f"{name}-{n}",
                event_name=name,
                customer_id=("acme", "globex")[n % 2],
                value=Decimal(n % 4 + 1),
                timestamp=hour + timedelta(minutes=n),
            )
            for n in range(40)
        ]
        await ledger.ingest_usage_events([*sent, *sent[:10]])  # ten sent twice

        [status] = await ledger.flush_mirrors(timeout=60)

        assert (status.depth, status.dead_letters) == (0, 0)
        span = {"start": hour, "end": hour + timedelta(hours=1), "window": "hour"}
        report = await ledger.reconcile("billing", **span)
        assert report.ok
        assert [(c.customer_id, c.status) for c in report.cells] == [
            ("acme", CellStatus.equal),
            ("globex", CellStatus.equal),
        ]
        assert sum(c.mirror or 0 for c in report.cells) == sum(e.value for e in sent)
        links = await ledger.link_mirror("billing")  # nothing left to create
        assert {link.outcome for link in links} == {LinkOutcome.unchanged, LinkOutcome.created}
        assert [link.mirror_id.startswith("mtr_") for link in links if link.kind == "meter"] == [
            True
        ]

        # A cancellation reaches Stripe as an adjustment (within its 24 hours), from a
        # forwarder of another process too: the ledger names the event's event name.
        async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as other:
            assert (await other.cancel_usage_events([sent[0].id, sent[1].id])).cancelled == [
                sent[0].id,
                sent[1].id,
            ]
            [status] = await other.flush_mirrors(timeout=60)
            assert (status.depth, status.dead_letters) == (0, 0)
            after = await other.reconcile("billing", **span)
        assert after.ok
        assert sum(c.mirror or 0 for c in after.cells) == sum(e.value for e in sent[2:])


async def test_a_backfill_to_stripe_sends_what_predates_the_mirror_once(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Stripe forgets identifiers after 24 hours: a backfill sends only what was stored
    before the mirror was added, and a second backfill of the same range is refused."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(2)
    before = acme_events(name, hour, 6)
    async with AsyncMetering("sql", url=url) as alone:
        await alone.create_meter(event_name=name)
        await alone.create_customer(id="acme")
        await alone.ingest_usage_events(before)
    async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as ledger:
        assert {link.outcome for link in await ledger.link_mirror("billing")} == {
            LinkOutcome.created
        }
        later = before[0].model_copy(update={"id": f"{name}-later"})
        await ledger.ingest_usage_events([later])  # owed to the mirror already

        assert await ledger.backfill_mirror("billing", start=hour) == len(before)
        [status] = await ledger.flush_mirrors(timeout=60)
        assert (status.depth, status.dead_letters) == (0, 0)
        report = await ledger.reconcile(
            "billing", start=hour, end=hour + timedelta(hours=1), window="hour"
        )
        assert report.ok
        assert [cell.mirror for cell in report.cells] == [Decimal(len(before) + 1)]

        with pytest.raises(ValidationError, match="backfilled from") as refused:
            await ledger.backfill_mirror("billing", start=hour - timedelta(hours=1))
        assert refused.value.field == "start"
        with pytest.raises(ValidationError, match="at most 35 days old"):
            await ledger.backfill_mirror("billing", start=hour - timedelta(days=40))


SECRET = "whsec_test_5dc0a6c3f1d24b6e"
KEYS = {"admin": {"scopes": ["meters:write", "usage:write", "customers:write", "metrics:read"]}}


def test_stripe_refusal_notices_become_dead_letters_and_forged_or_replayed_ones_do_nothing(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    options = {
        "mirrors": {"billing": {**stripe_mirror(fake_stripe)["billing"], "webhook_secret": SECRET}}
    }
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(2)
    admin = {"Authorization": "Bearer admin"}
    with serve_in_thread(create_app(AsyncMetering("sql", url=url, **options), keys=KEYS)) as base:

        def owed() -> dict[str, Any]:
            [status] = httpx.get(f"{base}/mirrors", headers=admin).json()
            return dict(status)

        assert httpx.post(f"{base}/meters", json={"event_name": name}, headers=admin).is_success
        assert httpx.post(f"{base}/customers", json={"id": "acme"}, headers=admin).is_success
        sent = [
            {
                "id": f"{name}-{n}",
                "event_name": name,
                "customer_id": "acme",
                "value": "2",
                "timestamp": hour.isoformat(),
            }
            for n in range(5)
        ]
        assert httpx.post(f"{base}/usage", json={"events": sent}, headers=admin).is_success
        deadline = time.monotonic() + 30
        while owed()["depth"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        [meter_id] = [
            m for m, meter in fake_stripe.state.meters.items() if meter["event_name"] == name
        ]
        refused = {f"{name}-1": "No customer", f"{name}-2": "No customer"}
        body, signed = fake_stripe.report_refusals(meter_id, refused, SECRET)
        notices = f"{base}/webhooks/stripe"

        _, forged = fake_stripe.report_refusals(meter_id, refused, "whsec_someone_else")
        stale = fake_stripe.report_refusals(
            meter_id, refused, SECRET, signed_at=int(time.time()) - 600
        )
        for content, headers in ((body, forged), (stale[0], stale[1]), (body, {})):
            answer = httpx.post(notices, content=content, headers=headers)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["field"] == "Stripe-Signature"
        assert owed()["dead_letters"] == 0  # nothing recorded

        def fetched() -> int:
            return sum(path.startswith("/v2/core/events/") for _, path in fake_stripe.requests)

        answer = httpx.post(notices, content=body, headers=signed)
        assert answer.json() == {"recorded": 2}
        assert fetched() == 1
        assert httpx.post(notices, content=body, headers=signed).json() == {"recorded": 0}
        assert owed()["dead_letters"] == 2  # the replay changed nothing
        assert fetched() == 1  # nor asked Stripe again (probe: each replay fetched it)
        page = httpx.get(f"{base}/metrics", headers=admin).text
        assert (
            'metering_mirror_reported_refusals_total{mirror="billing",provider="stripe"} 2.0'
            in page
        )

        span = {"start": hour, "end": hour + timedelta(hours=1), "window": "hour"}
        with Metering("sql", url=url, **options) as ledger:
            [cell] = ledger.reconcile("billing", **span).cells
            assert (cell.status, cell.ledger, cell.mirror) == (CellStatus.refused, 10, 6)
            assert ledger.retry_mirror_dead_letters("billing") == 2  # the customer fixed
            ledger.flush_mirrors(timeout=30)
            assert ledger.reconcile("billing", **span).ok


async def test_events_stripe_reports_refusing_are_sent_again_not_answered_duplicate(
    fake_stripe: FakeStripe,
) -> None:
    """The provider remembers what it delivered for a day and answers duplicate for it;
    an event Stripe refused later must reach Stripe when retried."""
    mirror = StripeProvider(settings_for(fake_stripe, webhook_secret=SECRET))
    name = f"calls_{uuid.uuid4().hex[:8]}"
    try:
        meter = await mirror.create_meter(MeterCreate(event_name=name))
        await mirror.create_customer(CustomerCreate(id="acme"))
        sent = UsageEvent(id=f"{name}-1", event_name=name, customer_id="acme")
        assert (await mirror.ingest_usage_events([sent])).accepted == [sent.id]
        assert (await mirror.ingest_usage_events([sent])).duplicates == [sent.id]

        body, signed = fake_stripe.report_refusals(meter.id, {sent.id: "No customer"}, SECRET)
        notice = await mirror.read_refusal_notice(body, {k.lower(): v for k, v in signed.items()})

        assert notice is not None
        assert notice.refused == {
            sent.id: "Stripe refused it later (meter_event_customer_not_found): No customer"
        }
        assert (await mirror.ingest_usage_events([sent])).accepted == [sent.id]
    finally:
        await mirror.aclose()


def signed_by(secret: str, body: bytes) -> dict[str, str]:
    """Stripe-Signature for `body`, as Stripe signs it."""
    at = int(time.time())
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {"stripe-signature": f"t={at},v1={digest}"}


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"a string"',
        b"not json",
        b'{"id": "evt_1", "object": "v2.core.event", "type": "v1.billing.meter.no_meter_found"}',
        b'{"id": "evt_1", "object": "event", "type": "billing.meter.error_report_triggered"}',
    ],
)
async def test_a_signed_notice_of_another_shape_is_bad_input_naming_the_body(
    fake_stripe: FakeStripe, body: bytes
) -> None:
    """Signed, so not a forgery: the shape is what is wrong (a 500 before, and a snapshot
    event's destination was told its signature did not verify: probe)."""
    mirror = StripeProvider(settings_for(fake_stripe, webhook_secret=SECRET))
    try:
        with pytest.raises(ValidationError, match="not one of Stripe's thin events") as refused:
            await mirror.read_refusal_notice(body, signed_by(SECRET, body))
        assert refused.value.field == "body"
        with pytest.raises(ValidationError, match="does not verify") as forged:
            await mirror.read_refusal_notice(body, signed_by("whsec_someone_else", body))
        assert forged.value.field == "Stripe-Signature"
    finally:
        await mirror.aclose()


async def test_a_notice_of_bytes_that_are_not_utf8_is_bad_input_not_a_failure(
    fake_stripe: FakeStripe,
) -> None:
    """The SDK decodes before it verifies: unhandled, anyone with no secret had a 500 and a
    logged traceback of every such request (review)."""
    mirror = StripeProvider(settings_for(fake_stripe, webhook_secret=SECRET))
    try:
        with pytest.raises(ValidationError, match="does not verify") as refused:
            await mirror.read_refusal_notice(b"\xff\xfe", signed_by("whsec_guess", b"x"))
    finally:
        await mirror.aclose()
    assert refused.value.field == "Stripe-Signature"


async def test_a_notice_one_of_two_stripe_mirrors_verifies_is_told_of_its_shape(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Not "does not verify" from the mirror asked last (review)."""
    other = "whsec_test_of_the_second_mirror"
    mirrors = {
        "eu": {**stripe_mirror(fake_stripe)["billing"], "webhook_secret": SECRET},
        "us": {**stripe_mirror(fake_stripe)["billing"], "webhook_secret": other},
    }
    ledger = SqlProvider(SqlSettings(url=f"sqlite:///{tmp_path / 'l.db'}", mirrors=mirrors))
    try:
        for secret in (SECRET, other):
            with pytest.raises(ValidationError, match="not one of Stripe's thin events") as bad:
                await ledger.receive_notice("stripe", b"[]", signed_by(secret, b"[]"))
            assert bad.value.field == "body"
    finally:
        await ledger.aclose()


def test_a_notice_no_mirror_can_verify_is_a_404_that_leaves_health_alone(
    fake_stripe: FakeStripe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Stripe mirror with no webhook secret, the usual setup of an operator who never
    configured webhooks: anyone, with no key, posting there made /health 503 for 30 s
    and logged a warning each time (probe). It is a 404, said once in the log."""
    ledger = AsyncMetering(
        "sql", url=f"sqlite:///{tmp_path / 'l.db'}", mirrors=stripe_mirror(fake_stripe)
    )
    with serve_in_thread(create_app(ledger, keys=KEYS)) as base:
        for _ in range(3):
            answer = httpx.post(f"{base}/webhooks/stripe", content=b"{}")
            assert answer.status_code == 404, answer.text
            assert "webhook secret" in answer.json()["error"]["message"]
        health = httpx.get(f"{base}/health")
    assert health.status_code == 200, health.text
    said = [r for r in caplog.records if "arrived unverified" in r.getMessage()]
    assert len(said) == 1


def test_a_webhook_body_over_64_kib_is_refused_before_it_is_read(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    ledger = AsyncMetering(
        "sql", url=f"sqlite:///{tmp_path / 'l.db'}", mirrors=stripe_mirror(fake_stripe)
    )
    app = create_app(ledger, keys=KEYS)
    with serve_in_thread(app) as base:
        answer = httpx.post(f"{base}/webhooks/stripe", content=b"x" * (65 * 1024))
    assert answer.status_code == 413
    assert "65536" in answer.json()["error"]["message"]


async def test_a_cancel_stripe_no_longer_takes_is_a_dead_letter_and_reconcile_shows_it(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Stripe adjusts only events received in the last 24 hours: a later cancel cannot
    reach it, and the cell shows over (Stripe would invoice the cancelled usage)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(3)
    sent = acme_events(name, hour, 3)
    async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as ledger:
        await ledger.create_meter(event_name=name)
        await ledger.create_customer(id="acme")
        await ledger.ingest_usage_events(sent)
        await ledger.flush_mirrors(timeout=60)
        with fake_stripe.state.lock:  # two days pass at Stripe
            fake_stripe.state.events[sent[0].id].received -= 2 * 86_400

        await ledger.cancel_usage_events([sent[0].id])
        [status] = await ledger.flush_mirrors(timeout=60)
        await after_stripe_processed(ledger)
        report = await ledger.reconcile(
            "billing", start=hour, end=hour + timedelta(hours=1), window="hour"
        )

    assert (status.depth, status.dead_letters) == (0, 1)
    assert not report.ok
    [cell] = report.cells
    assert (cell.ledger, cell.mirror, cell.status) == (2, 3, CellStatus.over)


async def test_a_failure_amid_cancels_keeps_those_stripe_took(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Stripe cancels one event a request, so a failure at the third of five had lost the
    two before it too, and at a high failure rate a batch never finished: after a failed
    batch the forwarder goes one at a time, keeps what Stripe took until the next failure,
    and leaves only the rest waiting."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(3)
    sent = acme_events(name, hour, 6)
    adjustments: list[str] = []

    def chaos(method: str, path: str) -> str | None:
        if path != "/v1/billing/meter_event_adjustments":
            return None
        adjustments.append(path)
        return "fail" if len(adjustments) in (3, 6) else None  # in the batch, then the 3rd alone

    ids = {e.id for e in sent}

    def cancelled() -> set[str]:  # of this test's events: the fake Stripe is shared
        return {i for i, e in fake_stripe.state.events.items() if e.cancelled} & ids

    provider = SqlProvider(SqlSettings(url=url, mirrors=stripe_mirror(fake_stripe)))
    await provider.create_meter(MeterCreate(event_name=name))
    await provider.create_customer(CustomerCreate(id="acme"))
    await provider.ingest_usage_events(sent)
    await provider.flush_mirrors(timeout=60)
    fake_stripe.chaos = chaos
    try:
        await provider.cancel_usage_events([e.id for e in sent[:5]])
        await provider.forwarder.forward("billing")

        assert cancelled() == {sent[0].id, sent[1].id}
        [status] = await provider.forwarder.status()
        assert (status.depth, status.dead_letters) == (3, 0)
        await provider.flush_mirrors(timeout=60)
        assert cancelled() == {e.id for e in sent[:5]}
        assert len(adjustments) == 3 + 3 + 3  # the batch, one at a time, the rest
    finally:
        fake_stripe.chaos = None  # the fake Stripe is shared by the module's tests
        await provider.aclose()


async def test_a_tenant_offboarded_before_its_usage_reached_stripe_is_billed_there(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Usage, then offboarding (sbt-aws sends them so), before the forwarder ran: Stripe
    never got the customer, every event was refused for good, and nothing could make it
    again (probe). The mirror gets the customer, by its id, while usage of it is owed."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(3)
    async with AsyncMetering(
        "sql", url=url, mirrors=stripe_mirror(fake_stripe), mirror_forwarder=False
    ) as ledger:
        await ledger.create_meter(event_name=name)
        await ledger.flush_mirrors(timeout=60)
        tenant = f"gone-{uuid.uuid4().hex[:6]}"  # the fake Stripe is shared
        await ledger.create_customer(id=tenant)
        await ledger.ingest_usage_events(
            [
                UsageEvent(id=f"{tenant}-{n}", event_name=name, customer_id=tenant, timestamp=hour)
                for n in range(3)
            ]
        )
        await ledger.delete_customer(tenant)
        [status] = await ledger.flush_mirrors(timeout=60)
        assert (status.depth, status.dead_letters) == (0, 0)

        def made(tenant: str) -> int:
            return sum(
                (c.get("metadata") or {}).get(TENANT_KEY) == tenant
                for c in fake_stripe.state.customers.values()
            )

        assert made(tenant) == 1
        await after_stripe_processed(ledger)
        [cell] = (
            await ledger.reconcile(
                "billing", start=hour, end=hour + timedelta(hours=1), window="hour"
            )
        ).cells
        assert (cell.customer_id, cell.status, cell.ledger, cell.mirror) == (
            tenant,
            CellStatus.equal,
            3,
            3,
        )

        await ledger.create_customer(id=f"{tenant}-idle")  # gone with no usage: not made there
        await ledger.delete_customer(f"{tenant}-idle")
        await ledger.flush_mirrors(timeout=60)
        assert made(f"{tenant}-idle") == 0


async def test_a_backfill_makes_a_tenant_offboarded_before_the_mirror_was_added(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Stripe added after a tenant was offboarded: linking makes only the ledger's
    customers, so the backfilled events were refused for good (review). The backfill
    owes the mirror the customer, by its id, ahead of its events."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    tenant = f"left-{uuid.uuid4().hex[:6]}"
    hour = hours_ago(3)
    async with AsyncMetering("sql", url=url) as before:
        await before.create_meter(event_name=name)
        await before.create_customer(id=tenant)
        await before.ingest_usage_events(
            [
                UsageEvent(id=f"{tenant}-{n}", event_name=name, customer_id=tenant, timestamp=hour)
                for n in range(3)
            ]
        )
        await before.delete_customer(tenant)
    async with AsyncMetering(
        "sql", url=url, mirrors=stripe_mirror(fake_stripe), mirror_forwarder=False
    ) as ledger:
        await ledger.link_mirror("billing")
        assert await ledger.backfill_mirror("billing", start=hour) == 3
        [status] = await ledger.flush_mirrors(timeout=60)
        assert (status.depth, status.dead_letters) == (0, 0)
        await after_stripe_processed(ledger)
        span = {"start": hour, "end": hour + timedelta(hours=1), "window": "hour"}
        [cell] = (await ledger.reconcile("billing", **span)).cells
        assert (cell.customer_id, cell.status, cell.mirror) == (tenant, CellStatus.equal, 3)


async def test_a_tenant_stripe_has_no_customer_for_is_a_cell_not_a_failed_reconcile(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Stripe answers not found for a customer it does not have: that failed the whole
    reconcile, every other customer's cells with it (probe). A correction for such a
    tenant is refused, and holds none of its events back."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(3)
    async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as ledger:
        await ledger.create_meter(event_name=name)
        await ledger.create_customer(id="acme")
        await ledger.ingest_usage_events(
            [
                *acme_events(name, hour, 2),
                UsageEvent(id="g1", event_name=name, customer_id="ghost", timestamp=hour),
            ]
        )
        [status] = await ledger.flush_mirrors(timeout=60)
        assert status.dead_letters == 1  # Stripe has no customer for ghost
    async with AsyncMetering("sql", url=url) as alone:  # a process without the mirror
        await alone.ingest_usage_events(
            [UsageEvent(id="p1", event_name=name, customer_id="phantom", timestamp=hour)]
        )
    async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as ledger:
        span = {"start": hour, "end": hour + timedelta(hours=1), "window": "hour"}
        await after_stripe_processed(ledger)

        report = await ledger.reconcile("billing", **span, repair=True)

        assert [(c.customer_id, c.status, c.repaired) for c in report.cells] == [
            ("acme", CellStatus.equal, False),
            ("ghost", CellStatus.refused, False),
            ("phantom", CellStatus.short, False),  # its correction refused: no customer
        ]
        provider = ledger.provider
        assert isinstance(provider, SqlProvider)
        async with provider._transaction(writes=False) as connection:
            assert (
                await connection.scalar(sa.select(sa.func.count()).select_from(mirror_repairs)) == 0
            )


async def test_a_whole_sum_stripe_holds_exactly_is_compared_exactly(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """3,000 bytes lost of 4e12 are within the relative margin float sums are allowed,
    and read equal (probe); whole sums under 2**53 a float holds exactly, so a
    difference there is events lost, and is repaired."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"bytes_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(3)
    span = {"start": hour, "end": hour + timedelta(hours=1), "window": "hour"}
    big = UsageEvent(
        id=f"{name}-big",
        event_name=name,
        customer_id="acme",
        timestamp=hour,
        value=Decimal(4_000_000_000_000),
    )
    lost = big.model_copy(update={"id": f"{name}-lost", "value": Decimal(3000)})
    async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as ledger:
        await ledger.create_meter(event_name=name)
        await ledger.create_customer(id="acme")
        await ledger.ingest_usage_events([big])
        await ledger.flush_mirrors(timeout=60)
        async with AsyncMetering("sql", url=url) as unmirrored:  # a rolling deploy
            await unmirrored.ingest_usage_events([lost])
        await after_stripe_processed(ledger)
        [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
        assert (cell.status, cell.repaired) == (CellStatus.short, True)
        assert (cell.ledger, cell.mirror) == (4_000_000_003_000, 4_000_000_000_000)


async def test_stripe_float_sums_agree_with_the_ledger_and_a_lost_cent_is_still_short(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Stripe sums in floating point: 1,000 events of 0.01 read 9.99999999999983 there,
    which exactly compared was short by 1.7E-13 and repaired so at every reconcile."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"gb_{uuid.uuid4().hex[:8]}"
    hour = hours_ago(3)
    async with AsyncMetering("sql", url=url, mirrors=stripe_mirror(fake_stripe)) as ledger:
        await ledger.create_meter(event_name=name)
        await ledger.create_customer(id="acme")
        sent = [
            UsageEvent(
                id=f"{name}-{n}",
                event_name=name,
                customer_id="acme",
                value=Decimal("0.01"),
                timestamp=hour + timedelta(seconds=n),
            )
            for n in range(1000)
        ]
        await ledger.ingest_usage_events(sent)
        await ledger.flush_mirrors(timeout=120)
        span = {"start": hour, "end": hour + timedelta(hours=1), "window": "hour"}

        [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells

        assert cell.ledger == Decimal(10)
        assert cell.mirror != cell.ledger  # Stripe's float sum
        assert (cell.status, cell.repaired) == (CellStatus.equal, False)
        provider = ledger.provider
        assert isinstance(provider, SqlProvider)
        await provider.forwarder.mirrors["billing"].cancel_usage_events(
            [sent[0].id], event_name=name
        )  # Stripe lost one cent, or has not shown it yet: within its processing delay
        [cell] = (await ledger.reconcile("billing", **span, repair=True)).cells
        assert (cell.status, cell.repaired) == (CellStatus.pending, False)  # not sent twice
        await after_stripe_processed(ledger)
        [cell] = (await ledger.reconcile("billing", **span)).cells
        assert cell.status is CellStatus.short
