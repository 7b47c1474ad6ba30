"""The sql store as the ledger, with Stripe as its billing mirror: meters and customers
follow the ledger there, usage reaches Stripe once, and reconcile proves the two agree
(the real stripe SDK against the fake Stripe on 127.0.0.1)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from metering_stripe.testing import FakeStripe

from metering_core import AsyncMetering, CellStatus, LinkOutcome, UsageEvent, ValidationError

from .conftest import API_KEY


def stripe_mirror(fake: FakeStripe) -> dict[str, Any]:
    return {"billing": {"provider": "stripe", "api_key": API_KEY, "base_url": fake.url}}


async def test_usage_reaches_stripe_once_and_reconciles(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
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


async def test_a_backfill_to_stripe_sends_what_predates_the_mirror_once(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """Stripe forgets identifiers after 24 hours: a backfill sends only what was stored
    before the mirror was added, and a second backfill of the same range is refused."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"calls_{uuid.uuid4().hex[:8]}"
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    before = [
        UsageEvent(id=f"{name}-{n}", event_name=name, customer_id="acme", timestamp=hour)
        for n in range(6)
    ]
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
