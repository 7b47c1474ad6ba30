"""An app holding only a tenant-bound usage key can meter through the HTTP provider."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from metering_core import AsyncMetering, AuthenticationError


async def test_a_tenant_key_ingests_and_reads_its_usage(service_url: str) -> None:
    async with AsyncMetering("http", base_url=service_url, api_key="admin-key") as admin:
        meter = await admin.create_meter(event_name="tenant_calls")
    now = datetime.now(UTC)
    async with AsyncMetering("http", base_url=service_url, api_key="acme-key") as app:
        await app.ingest_usage_event(event_name="tenant_calls", customer_id="acme", value=2)
        report = await app.flush()
        assert len(report.accepted) == 1
        assert not report.rejected
        usage = await app.fetch_usage(
            meter.id, start=now - timedelta(hours=1), end=now + timedelta(hours=1)
        )
        assert [(row.customer_id, str(row.value)) for row in usage.rows] == [("acme", "2")]
        with pytest.raises(AuthenticationError, match="globex"):
            await app.fetch_usage(
                meter.id,
                customer_id="globex",
                start=now - timedelta(hours=1),
                end=now + timedelta(hours=1),
            )
