"""`metering demo`: a month of usage for a few tenants on the in-memory provider."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from rich.console import Console
from rich.table import Table

from metering_core.client import Metering
from metering_core.models import Usage, UsageEvent

TENANTS = {"acme": 900, "globex": 400, "initech": 150}
"""Tenant id and its typical API calls per day."""
REGIONS = ("eu", "us")


def month_of_events(start: datetime, rng: random.Random) -> list[UsageEvent]:
    """API calls (in batches of 1 to 20, spread over each day) and user activity per tenant."""
    events: list[UsageEvent] = []
    for day in range(30):
        for tenant, per_day in TENANTS.items():
            weekend = (start + timedelta(days=day)).weekday() >= 5
            calls = int(per_day * (0.4 if weekend else 1.0) * rng.uniform(0.8, 1.2))
            while calls > 0:
                burst = min(calls, rng.randint(1, 20))
                calls -= burst
                moment = start + timedelta(days=day, seconds=rng.randrange(86_400))
                events.append(
                    UsageEvent(
                        event_name="api_calls",
                        customer_id=tenant,
                        value=burst,
                        timestamp=moment,
                        dimensions={"region": rng.choice(REGIONS)},
                    )
                )
                events.append(
                    UsageEvent(
                        event_name="active_users",
                        customer_id=tenant,
                        timestamp=moment,
                        dimensions={"user": f"{tenant}-user-{rng.randrange(per_day // 10)}"},
                    )
                )
    return events


def run_demo(out: Console) -> None:
    """Create two meters, ingest a month for three tenants (plus resends), print the usage."""
    start = (datetime.now(UTC) - timedelta(days=31)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    end = start + timedelta(days=30)
    events = month_of_events(start, random.Random(2026))
    with Metering("memory") as m:
        calls = m.create_meter(
            event_name="api_calls", display_name="API calls", dimensions=["region"]
        )
        users = m.create_meter(
            event_name="active_users",
            aggregation="unique_count",
            unique_dimension="user",
            dimensions=["user"],
        )
        m.ingest_usage_events(events)
        m.ingest_usage_events(events[:500])  # a retried delivery: the same ids count once
        report = m.flush()
        out.print(
            f"ingested {len(events):,} events through the pipeline: "
            f"{len(report.accepted):,} accepted, {len(report.duplicates):,} duplicates "
            f"(resent ids, counted once), {len(report.rejected)} rejected",
            soft_wrap=True,
        )
        daily = m.fetch_usage(calls.id, start=start, end=end, window="day")
        by_tenant = m.fetch_usage(
            calls.id, start=start, end=end, group_by=["customer_id", "region"]
        )
        active = m.fetch_usage(users.id, start=start, end=end, group_by=["customer_id"])
    out.print(_by_day(daily))
    out.print(_by_tenant(by_tenant, active))
    out.print(f"total API calls: {daily.total:,}")


def _by_day(daily: Usage) -> Table:
    """API calls per day with a bar each."""
    top = max(row.value for row in daily.rows)
    table = Table("day", "API calls", "", title="API calls by day (all tenants)")
    for row in daily.rows:
        table.add_row(
            f"{row.start:%a %Y-%m-%d}", f"{row.value:,}", "█" * round(float(row.value / top) * 40)
        )
    return table


def _by_tenant(by_tenant: Usage, active: Usage) -> Table:
    """API calls per tenant and region, beside each tenant's active users for the month."""
    users_of = {row.customer_id: row.value for row in active.rows}
    table = Table(
        "tenant",
        "region",
        "API calls",
        "active users (month)",
        title="API calls by tenant and region",
    )
    for row in by_tenant.rows:
        table.add_row(
            row.customer_id,
            row.dimensions["region"],
            f"{row.value:,}",
            f"{users_of[row.customer_id]:,}",
        )
    return table
